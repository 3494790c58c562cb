//! Recovery of the WAL from every kind of damage a disk or a crash can leave.

mod wal_support;

use rota::wal::{
    Fs, MemFs, RealFs, Record, Replayed, Wal, WalConfig, WalError, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use wal_support::*;

/// Records the largest single allocation, to prove a corrupt length never becomes one.
struct PeakAlloc;
static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

const PAYLOAD_LEN: usize = 20;

/// Writes `n` records, one append each, and shuts the log down cleanly.
fn write_records(fs: &MemFs, cfg: &WalConfig, n: u64) {
    let (wal, rec) = Wal::open(cfg.clone(), as_dyn(fs)).expect("open");
    let base = rec.last_seq;
    for i in 1..=n {
        let seqs =
            wal.append_blocking(vec![((i % 7) as u8, payload(base + i, PAYLOAD_LEN))]).expect("append");
        assert_eq!(seqs, base + i..base + i + 1);
    }
    wal.shutdown().expect("clean shutdown");
}

fn expected(range: std::ops::RangeInclusive<u64>) -> Vec<Record> {
    range.map(|s| Record { seq: s, kind: (s % 7) as u8, payload: payload(s, PAYLOAD_LEN) }).collect()
}

fn framed() -> u64 {
    (RECORD_HEADER_LEN + payload(1, PAYLOAD_LEN).len()) as u64
}

/// Byte offset of the record with `seq` in a single-segment log starting at 1.
fn offset_of(seq: u64) -> u64 {
    SEGMENT_HEADER_LEN as u64 + (seq - 1) * framed()
}

fn mem_dir() -> PathBuf {
    PathBuf::from(MEM_DIR)
}

#[test]
fn round_trip_on_the_real_filesystem_keeps_records_and_continues_seqs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path().join("wal"));
    let (wal, rec) = Wal::open(cfg.clone(), Arc::new(RealFs)).unwrap();
    assert_eq!((rec.last_seq, rec.records.len()), (0, 0));
    let mut want = Vec::new();
    for batch in 0..30u64 {
        let records: Vec<(u8, Vec<u8>)> =
            (0..batch % 4 + 1).map(|i| ((batch + i) as u8, payload(batch * 10 + i, 50))).collect();
        let range = wal.append_blocking(records.clone()).unwrap();
        for (seq, (kind, p)) in range.zip(records) {
            want.push(Record { seq, kind, payload: p });
        }
    }
    assert_eq!(wal.durable_seq(), want.len() as u64);
    let mut read_back = Vec::new();
    wal.read_range(3, |seq, kind, p| {
        read_back.push(Record { seq, kind, payload: p.to_vec() });
        true
    })
    .unwrap();
    assert_eq!(read_back, want[2..]);
    wal.shutdown().unwrap();

    let (wal, rec) = Wal::open(cfg, Arc::new(RealFs)).unwrap();
    assert_eq!(rec.records, want);
    assert_eq!(rec.torn_tail, None);
    let next = wal.append_blocking(vec![(1, b"more".to_vec())]).unwrap();
    assert_eq!(next.start, want.len() as u64 + 1);
}

#[test]
fn truncating_at_every_byte_of_the_last_record_recovers_all_earlier_records() {
    let fs = MemFs::new();
    let cfg = small_cfg(MEM_DIR);
    write_records(&fs, &cfg, 10);
    let seg = segments(&fs, &mem_dir())[0].clone();
    let last_start = offset_of(10);
    let full_len = fs.file_bytes(&seg).unwrap().len() as u64;
    assert_eq!(full_len, last_start + framed());
    for cut in last_start..full_len {
        let fs2 = fs.deep_clone();
        fs2.truncate(&seg, cut).unwrap();
        let (wal, rec) = Wal::open(cfg.clone(), as_dyn(&fs2)).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(rec.records, expected(1..=9), "cut at {cut}");
        if cut == last_start {
            assert_eq!(rec.torn_tail, None, "a cut on a record boundary is a clean end");
        } else {
            let torn =
                rec.torn_tail.clone().unwrap_or_else(|| panic!("cut at {cut}: torn tail not reported"));
            assert_eq!(
                (torn.segment, torn.offset, torn.bytes_cut),
                (seg.clone(), last_start, cut - last_start)
            );
        }
        // The cut is durable and the log continues right after the last good record.
        assert_eq!(wal.append_blocking(vec![(3, payload(10, PAYLOAD_LEN))]).unwrap(), 10..11);
        wal.shutdown().unwrap();
        let (_, rec) = Wal::open(cfg.clone(), as_dyn(&fs2)).unwrap();
        assert_eq!(rec.records, expected(1..=10), "cut at {cut}, after re-append");
    }
}

#[test]
fn zero_filled_tail_of_a_preallocated_segment_is_the_end_of_the_log_and_partial_records_in_it_are_torn() {
    let fs = MemFs::new();
    let cfg = WalConfig { preallocate: true, ..small_cfg(MEM_DIR) };
    write_records(&fs, &cfg, 10);
    let seg = segments(&fs, &mem_dir())[0].clone();
    let bytes = fs.file_bytes(&seg).unwrap();
    assert_eq!(bytes.len() as u64, cfg.segment_bytes, "segment is preallocated");
    let last_start = offset_of(10);
    let last_end = last_start + framed();
    for cut in last_start..last_end {
        let mut damaged = bytes.clone();
        damaged[cut as usize..last_end as usize].fill(0);
        let fs2 = fs.deep_clone();
        fs2.put_file(&seg, &damaged);
        let (wal, rec) =
            Wal::open(cfg.clone(), as_dyn(&fs2)).unwrap_or_else(|e| panic!("zeroed from {cut}: {e}"));
        assert_eq!(rec.records, expected(1..=9), "zeroed from {cut}");
        assert_eq!(rec.torn_tail.is_some(), cut > last_start, "zeroed from {cut}");
        wal.shutdown().unwrap();
    }
    let (_, rec) = Wal::open(cfg, as_dyn(&fs)).unwrap();
    assert_eq!((rec.records.len(), rec.torn_tail), (10, None));
}

#[test]
fn a_flipped_bit_anywhere_in_a_middle_record_is_refused_with_segment_offset_and_seq() {
    let fs = MemFs::new();
    let cfg = small_cfg(MEM_DIR);
    write_records(&fs, &cfg, 10);
    let seg = segments(&fs, &mem_dir())[0].clone();
    let at = offset_of(6);
    for bit in 0..framed() * 8 {
        let fs2 = fs.deep_clone();
        fs2.flip_bit(&seg, at + bit / 8, (bit % 8) as u8).unwrap();
        match Wal::open(cfg.clone(), as_dyn(&fs2)) {
            Err(WalError::Corrupt { segment, offset, expected_seq, reason }) => {
                assert_eq!((segment, offset, expected_seq), (seg.clone(), at, 6), "bit {bit}: {reason}");
            }
            Err(e) => panic!("bit {bit}: wrong error {e}"),
            Ok(_) => panic!("bit {bit}: damage in the middle was accepted"),
        }
    }
}

#[test]
fn a_flipped_bit_in_a_length_field_never_allocates_gigabytes() {
    let fs = MemFs::new();
    let cfg = small_cfg(MEM_DIR);
    write_records(&fs, &cfg, 10);
    let seg = segments(&fs, &mem_dir())[0].clone();
    // Bit 31 of the length: a 2 GiB record if the length were trusted.
    let middle = fs.deep_clone();
    middle.flip_bit(&seg, offset_of(5) + 3, 7).unwrap();
    let last = fs.deep_clone();
    last.flip_bit(&seg, offset_of(10) + 3, 7).unwrap();

    LARGEST_ALLOC.store(0, Ordering::Relaxed);
    let err = Wal::open(cfg.clone(), as_dyn(&middle)).err().expect("middle damage is refused");
    assert!(matches!(err, WalError::Corrupt { expected_seq: 5, .. }), "{err}");
    let (_, rec) = Wal::open(cfg, as_dyn(&last)).expect("a bad length in the last record is a torn tail");
    assert_eq!(rec.records.len(), 9);
    let largest = LARGEST_ALLOC.load(Ordering::Relaxed);
    assert!(largest < 1 << 30, "largest allocation was {largest} bytes");
}

#[test]
fn empty_and_missing_directories_start_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in [tmp.path().to_path_buf(), tmp.path().join("missing/nested")] {
        let (wal, rec) = Wal::open(small_cfg(&dir), Arc::new(RealFs)).unwrap();
        assert_eq!((rec.last_seq, rec.records.len(), rec.snapshot, rec.torn_tail), (0, 0, None, None));
        assert!(dir.is_dir());
        assert_eq!(wal.append_blocking(vec![(0, vec![])]).unwrap(), 1..2);
        wal.shutdown().unwrap();
    }
    let (_, fs) = mem();
    let (_, rec) = Wal::open(small_cfg(MEM_DIR), fs).unwrap();
    assert_eq!(rec.last_seq, 0);
}

#[test]
fn segments_roll_over_and_recover_in_order() {
    let fs = MemFs::new();
    let cfg = small_cfg(MEM_DIR);
    let (wal, _) = Wal::open(cfg.clone(), as_dyn(&fs)).unwrap();
    let mut want = Vec::new();
    for i in 1..=500u64 {
        let p = payload(i, 100);
        want.push(Record { seq: i, kind: 9, payload: p.clone() });
        wal.append_blocking(vec![(9, p)]).unwrap();
    }
    let stats = wal.stats();
    wal.shutdown().unwrap();
    let segs = segments(&fs, &mem_dir());
    assert!(segs.len() >= 10, "only {} segments", segs.len());
    assert_eq!(stats.segments_created as usize, segs.len());
    for seg in &segs {
        assert!(fs.file_bytes(seg).unwrap().len() as u64 <= cfg.segment_bytes);
    }
    let (_, rec) = Wal::open(cfg, as_dyn(&fs)).unwrap();
    assert_eq!(rec.records, want);
    assert_eq!(rec.segments_read, segs.len());
}

/// 200 records of 100 bytes, one append each, in 4 KiB segments (several of them),
/// cleanly shut down: the disk, the configuration and the segments in order.
fn two_hundred_records_in_small_segments() -> (MemFs, WalConfig, Vec<PathBuf>) {
    let fs = MemFs::new();
    let cfg = small_cfg(MEM_DIR);
    let (wal, _) = Wal::open(cfg.clone(), as_dyn(&fs)).unwrap();
    for i in 1..=200u64 {
        wal.append_blocking(vec![(1, payload(i, 100))]).unwrap();
    }
    wal.shutdown().unwrap();
    let segs = segments(&fs, &mem_dir());
    (fs, cfg, segs)
}

#[test]
fn a_missing_middle_segment_is_a_seq_gap_and_refused() {
    let (fs, cfg, segs) = two_hundred_records_in_small_segments();
    fs.remove(&segs[2]).unwrap();
    fs.sync_dir(&mem_dir()).unwrap();
    let gap_at: u64 = segs[2].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    match Wal::open(cfg, as_dyn(&fs)) {
        Err(WalError::Corrupt { segment, offset, expected_seq, .. }) => {
            assert_eq!((segment, offset, expected_seq), (segs[3].clone(), 0, gap_at));
        }
        other => panic!("gap accepted or wrong error: {:?}", other.map(|_| ())),
    }
}

/// Writes `n` records, each its own append, and returns the seqs' last value.
#[test]
fn snapshots_compact_covered_segments_only_after_they_are_durable_and_recovery_replays_the_rest() {
    let fs = MemFs::new();
    let dir = mem_dir();
    let cfg = small_cfg(MEM_DIR);
    let (wal, _) = Wal::open(cfg.clone(), as_dyn(&fs)).unwrap();
    append_many(&wal, 300);
    wal.write_snapshot(150, b"state at 150").unwrap();
    let after_first = segments(&fs, &dir);
    assert_eq!(after_first[0], dir.join("00000000000000000001.wal"), "one snapshot: nothing compacted yet");
    append_many(&wal, 300);

    // A snapshot whose sync fails is not durable: nothing may be deleted for it.
    let before = segments(&fs, &dir);
    fs.inject(rota::wal::Fault::SyncError);
    assert!(wal.write_snapshot(450, b"state at 450").is_err());
    assert_eq!(segments(&fs, &dir), before);

    wal.write_snapshot(450, b"state at 450").unwrap();
    // A snapshot older than the newest (a periodic one still encoding when the stop's
    // final one was written) is not written, and says it was superseded: not a
    // failure (the daemon does not count it in `rota_snapshot_failures_total`).
    match wal.write_snapshot(300, b"state at 300") {
        Err(WalError::Superseded { covers_seq: 300, newest: 450 }) => {}
        other => panic!("an older snapshot answered {other:?}"),
    }
    let after = segments(&fs, &dir);
    assert!(after.len() < before.len(), "segments covered by the older snapshot are deleted");
    let first_kept: u64 = after[0].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert!(first_kept <= 151, "records after the older snapshot must stay (first kept {first_kept})");
    assert!(matches!(wal.read_range(1, |_, _, _| true), Err(WalError::Compacted { .. })));
    wal.shutdown().unwrap();

    let mut seen = Vec::new();
    let (_, rec) = Wal::open_with(cfg, as_dyn(&fs), |r| match r {
        Replayed::Snapshot { covers_seq, bytes } => seen.push((covers_seq, bytes.to_vec())),
        Replayed::Record { seq, .. } => seen.push((seq, Vec::new())),
    })
    .unwrap();
    assert_eq!(seen[0], (450, b"state at 450".to_vec()));
    let seqs: Vec<u64> = seen[1..].iter().map(|s| s.0).collect();
    assert_eq!(seqs, (451..=600).collect::<Vec<_>>());
    assert_eq!((rec.snapshot_seq, rec.records_replayed, rec.last_seq), (Some(450), 150, 600));
}

#[test]
fn a_corrupt_newest_snapshot_falls_back_to_the_older_one() {
    let fs = MemFs::new();
    let dir = mem_dir();
    let cfg = small_cfg(MEM_DIR);
    let (wal, _) = Wal::open(cfg.clone(), as_dyn(&fs)).unwrap();
    append_many(&wal, 300);
    wal.write_snapshot(150, b"old").unwrap();
    append_many(&wal, 300);
    wal.write_snapshot(450, b"new").unwrap();
    wal.shutdown().unwrap();
    let newest = dir.join("snapshot-00000000000000000450.snap");
    fs.flip_bit(&newest, 42, 1).unwrap();

    let (wal, rec) = Wal::open(cfg.clone(), as_dyn(&fs)).unwrap();
    assert_eq!(rec.snapshot, Some((150, b"old".to_vec())));
    assert_eq!(rec.skipped_snapshots.len(), 1);
    assert_eq!(rec.skipped_snapshots[0].path, newest);
    let seqs: Vec<u64> = rec.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (151..=600).collect::<Vec<_>>());

    // The invalid snapshot is set aside, not counted among the two kept: the next
    // snapshot keeps the one recovery used as its fallback. (Counted, it pushed that
    // one out, and a damaged new snapshot then left nothing to start from.)
    assert!(fs.file_bytes(&dir.join("snapshot-00000000000000000450.snap.corrupt")).is_ok(), "set aside");
    append_many(&wal, 100);
    wal.write_snapshot(700, b"newer").unwrap();
    wal.shutdown().unwrap();
    fs.flip_bit(&dir.join("snapshot-00000000000000000700.snap"), 42, 1).unwrap();
    let (_, rec) = Wal::open(cfg, as_dyn(&fs)).expect("the fallback snapshot is still there");
    assert_eq!(rec.snapshot, Some((150, b"old".to_vec())));
    assert_eq!(rec.last_seq, 700);
}

#[test]
fn a_full_queue_answers_full_instead_of_blocking() {
    let (_, fs) = mem();
    let cfg = WalConfig { queue_capacity: 1, ..small_cfg(MEM_DIR) };
    let (wal, _) = Wal::open(cfg, fs).unwrap();
    let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    // The first callback holds the writer thread until the test opens the gate.
    wal.try_append(
        vec![(1, vec![1])],
        Box::new(move |_| {
            entered_tx.send(()).unwrap();
            gate_rx.recv().unwrap();
        }),
    )
    .unwrap();
    entered_rx.recv().unwrap();
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let d = done_tx.clone();
    wal.try_append(vec![(1, vec![2])], Box::new(move |r| d.send(r).unwrap())).unwrap();
    let d = done_tx.clone();
    let refused = wal.try_append(vec![(1, vec![3])], Box::new(move |r| d.send(r).unwrap()));
    assert!(matches!(refused, Err(WalError::Full)));
    assert_eq!(wal.stats().queue_full, 1);
    gate_tx.send(()).unwrap();
    assert_eq!(done_rx.recv().unwrap().unwrap(), 2..3);
    wal.shutdown().unwrap();
    assert!(done_rx.try_recv().is_err(), "the refused request's callback is never called");
}

#[test]
fn oversized_records_are_refused_before_queueing() {
    let (_, fs) = mem();
    let (wal, _) = Wal::open(small_cfg(MEM_DIR), fs).unwrap();
    let err = wal.append_blocking(vec![(1, vec![0; rota::wal::MAX_RECORD_BYTES + 1])]).unwrap_err();
    assert!(matches!(err, WalError::RecordTooLarge { .. }));
    assert_eq!(wal.last_seq(), 0);
}

#[test]
fn open_with_streams_records_without_collecting_them() {
    let fs = MemFs::new();
    write_records(&fs, &small_cfg(MEM_DIR), 50);
    let mut n = 0;
    let (_, rec) = Wal::open_with(small_cfg(MEM_DIR), as_dyn(&fs), |r| {
        if let Replayed::Record { seq, payload: p, .. } = r {
            n += 1;
            assert_eq!(p, payload(seq, PAYLOAD_LEN));
        }
    })
    .unwrap();
    assert_eq!((n, rec.records.len(), rec.records_replayed), (50, 0, 50));
}

#[test]
fn interrupted_snapshot_temp_files_are_removed_by_recovery() {
    let fs = MemFs::new();
    write_records(&fs, &small_cfg(MEM_DIR), 5);
    let tmp = Path::new(MEM_DIR).join("snapshot-00000000000000000005.snap.tmp");
    fs.put_file(&tmp, b"half a snapshot");
    let (_, rec) = Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).unwrap();
    assert_eq!((rec.snapshot_seq, rec.records.len()), (None, 5));
    assert!(fs.file_bytes(&tmp).is_err());
}

#[test]
fn preallocated_segments_roll_over_through_the_background_spare_and_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = WalConfig { segment_bytes: 8192, preallocate: true, ..WalConfig::new(tmp.path()) };
    let (wal, _) = Wal::open(cfg.clone(), Arc::new(RealFs)).unwrap();
    for i in 1..=400u64 {
        wal.append_blocking(vec![(1, payload(i, 100))]).unwrap();
    }
    wal.shutdown().unwrap();
    let segs = segments(&RealFs, tmp.path());
    assert!(segs.len() >= 5, "{} segments", segs.len());
    for seg in &segs {
        assert_eq!(std::fs::metadata(seg).unwrap().len(), 8192, "{} is preallocated", seg.display());
    }
    let (_, rec) = Wal::open(cfg, Arc::new(RealFs)).unwrap();
    assert_eq!((rec.records.len(), rec.torn_tail), (400, None));
    let leftovers: Vec<_> =
        RealFs.list(tmp.path()).unwrap().into_iter().filter(|n| n.ends_with(".tmp")).collect();
    assert!(leftovers.len() <= 1, "at most the spare being prepared: {leftovers:?}");
}

#[test]
fn read_range_returns_durable_records_across_segments_and_chunks_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    // Preallocated segments bigger than one read chunk, records of up to 3 MiB.
    let cfg = WalConfig { segment_bytes: 4 << 20, ..WalConfig::new(tmp.path()) };
    let (wal, _) = Wal::open(cfg, Arc::new(RealFs)).unwrap();
    let size = |i: u64| {
        if i % 50 == 0 {
            3 << 20
        } else {
            1 + (i as usize * 37) % 900
        }
    };
    for i in 1..=300u64 {
        wal.append_blocking(vec![((i % 5) as u8, payload(i, size(i)))]).unwrap();
    }
    assert!(segments(&RealFs, tmp.path()).len() >= 3);
    for from in [1u64, 49, 50, 51, 149, 299, 300] {
        let mut seqs = Vec::new();
        wal.read_range(from, |seq, kind, p| {
            assert_eq!((kind, p), ((seq % 5) as u8, &payload(seq, size(seq))[..]));
            seqs.push(seq);
            true
        })
        .unwrap();
        assert_eq!(seqs, (from..=300).collect::<Vec<_>>(), "from {from}");
    }
    // Stops when asked, and returns nothing past the durable watermark.
    let mut n = 0;
    wal.read_range(10, |_, _, _| {
        n += 1;
        n < 5
    })
    .unwrap();
    assert_eq!(n, 5);
    wal.read_range(301, |_, _, _| panic!("nothing is durable past 300")).unwrap();
}

#[test]
fn read_range_while_appending_sees_a_growing_prefix_and_never_a_partial_batch() {
    let (_, fs) = mem();
    let (wal, _) = Wal::open(small_cfg(MEM_DIR), fs).unwrap();
    std::thread::scope(|s| {
        let writer = wal.clone();
        s.spawn(move || {
            for i in 1..=2_000u64 {
                writer.append_blocking(vec![(1, payload(i, 50))]).unwrap();
            }
        });
        let mut last_seen = 0;
        while last_seen < 2_000 {
            let mut seen = 0;
            wal.read_range(1, |seq, _, p| {
                assert_eq!(seq, seen + 1);
                assert_eq!(p, payload(seq, 50));
                seen = seq;
                true
            })
            .unwrap();
            assert!(seen >= last_seen);
            last_seen = seen;
        }
    });
}

/// A log whose compacted segments are kept for reuse, driven until a live segment
/// is a reused file: returns the config, the last seq written and that segment
/// with its first seq. Records are `payload(seq, 100)` (124 bytes framed).
fn log_with_a_reused_segment(fs: &MemFs) -> (WalConfig, u64, PathBuf, u64) {
    let dir = mem_dir();
    let cfg = WalConfig { preallocate: true, recycle_segments: 4, keep_snapshots: 1, ..small_cfg(MEM_DIR) };
    let (wal, _) = Wal::open(cfg.clone(), as_dyn(fs)).unwrap();
    append_many(&wal, 300);
    wal.write_snapshot(300, b"state at 300").unwrap();
    let stats = wal.stats();
    assert_eq!(stats.segments_recycled, 4, "four compacted segments kept for reuse: {stats:?}");
    assert!(stats.segments_deleted >= 1, "the rest deleted: {stats:?}");
    let kept: Vec<String> =
        fs.list(&dir).unwrap().into_iter().filter(|n| n.starts_with("recycled-")).collect();
    assert_eq!(kept.len() + stats.segments_reused as usize, 4, "{kept:?}");

    // Early records (seqs 1..=30 lived in the first, compacted segments) are what a
    // reused file still holds past the new segment's own records.
    let leftover = |bytes: &[u8]| {
        (1..=30u64).any(|s| {
            let p = payload(s, 100);
            bytes.windows(p.len()).any(|w| w == p.as_slice())
        })
    };
    for _ in 0..2_000 {
        let last = append_many(&wal, 1);
        let live = segments(fs, &dir);
        let newest = live.last().unwrap().clone();
        let first: u64 = newest.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        // Wait until the newest segment is a reused file with a few records of its own.
        if first > 300 && last >= first + 3 && leftover(&fs.file_bytes(&newest).unwrap()) {
            assert!(wal.stats().segments_reused >= 1);
            wal.shutdown().unwrap();
            return (cfg, last, newest, first);
        }
    }
    panic!("no segment was made from a recycled file: {:?}", wal.stats());
}

#[test]
fn compacted_segments_are_reused_and_their_old_records_are_never_replayed() {
    let fs = MemFs::new();
    let (cfg, last, _, _) = log_with_a_reused_segment(&fs);
    // Kept recycled files are adopted at restart up to the configured number.
    let recycled =
        |fs: &MemFs| fs.list(&mem_dir()).unwrap().iter().filter(|n| n.starts_with("recycled-")).count();
    let fs2 = fs.deep_clone();
    let before = recycled(&fs2);
    assert!(before > 0, "some of the four recycled files are still waiting to be reused");
    let (wal, _) = Wal::open(cfg.clone(), as_dyn(&fs2)).unwrap();
    wal.shutdown().unwrap();
    assert!(recycled(&fs2) + 1 >= before, "adopted at start, not deleted (one may be the new spare)");
    let (wal, _) = Wal::open(WalConfig { recycle_segments: 0, ..cfg.clone() }, as_dyn(&fs2)).unwrap();
    wal.shutdown().unwrap();
    assert_eq!(recycled(&fs2), 0, "with recycle_segments = 0 the kept files are deleted at start");
    let mut seqs = Vec::new();
    let (wal, rec) = Wal::open_with(cfg.clone(), as_dyn(&fs), |r| {
        if let Replayed::Record { seq, .. } = r {
            seqs.push(seq)
        }
    })
    .unwrap();
    assert_eq!(seqs, (301..=last).collect::<Vec<_>>(), "only the records after the snapshot, once each");
    assert_eq!((rec.snapshot_seq, rec.last_seq, rec.torn_tail), (Some(300), last, None));
    let mut read = Vec::new();
    wal.read_range(301, |seq, _, _| {
        read.push(seq);
        true
    })
    .unwrap();
    assert_eq!(read, seqs, "reading the log back skips the old content of reused files too");
    // Appending continues after the last record, over the old content.
    assert_eq!(append_many(&wal, 40), last + 40);
    wal.shutdown().unwrap();
    let (_, rec) = Wal::open(cfg.clone(), as_dyn(&fs)).unwrap();
    assert_eq!((rec.last_seq, rec.records.len() as u64, rec.torn_tail), (last + 40, last + 40 - 300, None));
}

#[test]
fn a_record_torn_over_recycled_content_is_the_end_of_the_log_and_later_damage_is_still_refused() {
    let fs = MemFs::new();
    let (cfg, last, seg, first) = log_with_a_reused_segment(&fs);
    let framed = (RECORD_HEADER_LEN + payload(1, 100).len()) as u64;
    let end = SEGMENT_HEADER_LEN as u64 + (last - first + 1) * framed;
    let bytes = fs.file_bytes(&seg).unwrap();
    assert_eq!(bytes.len() as u64, cfg.segment_bytes, "the reused file keeps its size");

    // A crash tore the next record: half of it landed over the old content.
    let mut torn = bytes.clone();
    let next = &bytes[(end - framed) as usize..end as usize];
    torn[end as usize..(end + framed / 2) as usize].copy_from_slice(&next[..(framed / 2) as usize]);
    torn[end as usize + 4] ^= 0x55; // not a copy of the previous record's seq
    let fs2 = fs.deep_clone();
    fs2.put_file(&seg, &torn);
    let (wal, rec) = Wal::open(cfg.clone(), as_dyn(&fs2)).expect("a torn record over old content is the end");
    assert_eq!(rec.last_seq, last);
    assert_eq!(append_many(&wal, 3), last + 3);
    wal.shutdown().unwrap();
    assert_eq!(Wal::open(cfg.clone(), as_dyn(&fs2)).unwrap().1.last_seq, last + 3);

    // A valid record of this segment's own life after the damage is damage in the
    // middle, as without recycling: refused.
    let mut damaged = bytes.clone();
    let early = &bytes[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + framed as usize];
    damaged[end as usize..(end + 7) as usize].fill(0xEE);
    let later = end as usize + 7 + 3;
    damaged[later..later + framed as usize].copy_from_slice(early);
    let fs3 = fs.deep_clone();
    fs3.put_file(&seg, &damaged);
    match Wal::open(cfg.clone(), as_dyn(&fs3)) {
        Err(WalError::Corrupt { offset, expected_seq, .. }) => {
            assert_eq!((offset, expected_seq), (end, last + 1))
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a record of the segment after damage was accepted"),
    }

    // A flipped bit in a reused segment's own record, with later segments after it:
    // records are missing, refused.
    let (wal, _) = Wal::open(cfg.clone(), as_dyn(&fs)).unwrap();
    while segments(&fs, &mem_dir()).last() == Some(&seg) {
        append_many(&wal, 1);
    }
    wal.shutdown().unwrap();
    let per_segment = (cfg.segment_bytes - SEGMENT_HEADER_LEN as u64) / framed;
    let last_in_seg = SEGMENT_HEADER_LEN as u64 + (per_segment - 1) * framed;
    fs.flip_bit(&seg, last_in_seg + 30, 3).unwrap();
    match Wal::open(cfg, as_dyn(&fs)) {
        Err(WalError::Corrupt { expected_seq, reason, .. }) => {
            assert_eq!(expected_seq, first + per_segment - 1, "{reason}")
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a damaged record before later segments was accepted"),
    }
}

#[test]
fn a_snapshot_written_at_once_recovers_like_a_paced_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = WalConfig::new(tmp.path());
    let (wal, _) = Wal::open(cfg.clone(), Arc::new(RealFs)).unwrap();
    append_many(&wal, 20);
    let state: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    wal.write_snapshot_paced(10, &state[..1000], true).unwrap();
    wal.write_snapshot_paced(20, &state, false).unwrap();
    wal.shutdown().unwrap();
    let (_, rec) = Wal::open(cfg, Arc::new(RealFs)).unwrap();
    assert_eq!(rec.snapshot, Some((20, state)), "the newest snapshot, every byte");
    assert_eq!((rec.records_replayed, rec.last_seq), (0, 20));
}

#[test]
fn the_prepared_next_segment_survives_a_restart_and_becomes_the_next_segment() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = WalConfig {
        segment_bytes: 8192,
        preallocate: true,
        recycle_segments: 0,
        ..WalConfig::new(tmp.path())
    };
    let (wal, _) = Wal::open(cfg.clone(), Arc::new(RealFs)).unwrap();
    append_many(&wal, 10);
    wal.shutdown().unwrap();
    let spare = tmp.path().join("next-segment.wal.tmp");
    let inode = std::fs::metadata(&spare).expect("a spare was prepared").ino();

    let (wal, rec) = Wal::open(cfg.clone(), Arc::new(RealFs)).unwrap();
    assert_eq!(rec.last_seq, 10);
    // The preparing thread takes the kept file instead of zero-filling a new one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while wal.stats().segments_reused == 0 {
        assert!(std::time::Instant::now() < deadline, "the kept spare was never taken: {:?}", wal.stats());
        std::thread::yield_now();
    }
    let before = segments(&RealFs, tmp.path());
    while segments(&RealFs, tmp.path()) == before {
        append_many(&wal, 1);
    }
    let newest = segments(&RealFs, tmp.path()).pop().unwrap();
    assert_eq!(
        std::fs::metadata(&newest).unwrap().ino(),
        inode,
        "the kept spare became {}",
        newest.display()
    );
    let last = wal.last_seq();
    wal.shutdown().unwrap();
    let (_, rec) = Wal::open(cfg, Arc::new(RealFs)).unwrap();
    assert_eq!((rec.records.len() as u64, rec.last_seq, rec.torn_tail), (last, last, None));
}

/// A segment before the last that ends in bytes that are not a record (the rest of a
/// recycled file's old last record, say), then a newest segment whose header a crash
/// tore: the log ends in the segment before, and the writer carries on there. It
/// carried on in the segment before that one (the last that ended cleanly), writing
/// the next seq after records it does not follow: acknowledged, then refused at the
/// next start as a seq regression.
#[test]
fn after_a_torn_newest_header_the_log_continues_in_the_segment_that_ends_it() {
    let (fs, cfg, segs) = two_hundred_records_in_small_segments();
    assert!(segs.len() >= 4, "{} segments", segs.len());
    let (a, b) = (&segs[segs.len() - 2], &segs[segs.len() - 1]);
    let b_first: u64 = b.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    // A ends in a fragment of a record (no record follows it); B's header is torn.
    let mut a_bytes = fs.file_bytes(a).unwrap();
    a_bytes.extend_from_slice(&[0xAB; 11]);
    fs.put_file(a, &a_bytes);
    fs.put_file(b, &[0u8; 10]);
    let (wal, rec) = Wal::open(cfg.clone(), as_dyn(&fs)).expect("a torn newest header is a torn tail");
    assert_eq!(rec.last_seq, b_first - 1, "the log ends where A does");
    // A small record: it would fit in what is left of any earlier segment.
    let next = wal.append_blocking(vec![(1, payload(b_first, 1))]).unwrap();
    assert_eq!(next, b_first..b_first + 1);
    wal.shutdown().unwrap();
    let (_, rec) = Wal::open(cfg, as_dyn(&fs)).expect("the next start reads what was acknowledged");
    assert_eq!(rec.last_seq, b_first);
    assert_eq!(rec.records.last().map(|r| (r.seq, r.payload.clone())), Some((b_first, payload(b_first, 1))));
}

/// Damage in a record the snapshot already covers, in the segment that holds the
/// snapshot's seq: replay needs nothing before the snapshot, so the damaged record is
/// stepped over and every record after the snapshot is recovered (recovery refused
/// the log, and `rota wal repair` then cut the records after the snapshot with the
/// damage). Damage in a record after the snapshot is still refused.
#[test]
fn damage_in_a_record_the_snapshot_covers_is_stepped_over_and_nothing_after_it_is_lost() {
    let fs = MemFs::new();
    let cfg = small_cfg(MEM_DIR);
    write_records(&fs, &cfg, 10);
    let (wal, _) = Wal::open(cfg.clone(), as_dyn(&fs)).unwrap();
    wal.write_snapshot(8, b"state at 8").unwrap();
    wal.shutdown().unwrap();
    let seg = segments(&fs, &mem_dir())[0].clone();
    for (seq, covered) in [(6, true), (8, true), (9, false)] {
        for bit in [0, 77, framed() * 8 - 1] {
            let fs2 = fs.deep_clone();
            fs2.flip_bit(&seg, offset_of(seq) + bit / 8, (bit % 8) as u8).unwrap();
            match (Wal::open(cfg.clone(), as_dyn(&fs2)), covered) {
                (Ok((_, rec)), true) => {
                    assert_eq!((rec.snapshot_seq, rec.last_seq), (Some(8), 10), "seq {seq} bit {bit}");
                    assert_eq!(rec.records, expected(9..=10), "seq {seq} bit {bit}");
                }
                (Err(WalError::Corrupt { offset, expected_seq, .. }), false) => {
                    assert_eq!((offset, expected_seq), (offset_of(seq), seq), "seq {seq} bit {bit}");
                }
                (Ok(_), false) => panic!("seq {seq} bit {bit}: damage after the snapshot accepted"),
                (Err(e), _) => panic!("seq {seq} bit {bit} (covered: {covered}): {e}"),
            }
        }
    }
}

/// A segment named for seq 0 (seqs start at 1; not one rota wrote) is refused cleanly,
/// naming it, not a panic on the seq before it.
#[test]
fn a_segment_named_for_seq_zero_is_refused_not_a_panic() {
    let fs = MemFs::new();
    let cfg = small_cfg(MEM_DIR);
    write_records(&fs, &cfg, 3);
    let seg = segments(&fs, &mem_dir())[0].clone();
    // Its header only, rewritten to say seq 0 (with a valid checksum).
    let mut header = fs.file_bytes(&seg).unwrap()[..SEGMENT_HEADER_LEN].to_vec();
    header[16..24].copy_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c(&header[0..28]);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    let zero = mem_dir().join("00000000000000000000.wal");
    fs.put_file(&zero, &header);
    fs.remove(&seg).unwrap();
    match Wal::open(cfg, as_dyn(&fs)) {
        Err(WalError::Corrupt { segment, .. }) => assert_eq!(segment, zero),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// An append of several records is durable as one unit: one that does not fit in what
/// is left of the current segment starts the next one whole, instead of leaving its
/// first records in the old segment, made durable alone by the rollover's sync.
#[test]
fn an_append_of_several_records_is_never_split_across_two_segments() {
    let fs = MemFs::new();
    let cfg = small_cfg(MEM_DIR);
    let (wal, _) = Wal::open(cfg.clone(), as_dyn(&fs)).unwrap();
    for seq in 1..=30u64 {
        wal.append_blocking(vec![(1, payload(seq, 100))]).unwrap();
    }
    let unit: Vec<(u8, Vec<u8>)> = (31..=36).map(|s| (1, payload(s, 100))).collect();
    assert_eq!(wal.append_blocking(unit).unwrap(), 31..37);
    wal.shutdown().unwrap();
    let holder = |seq: u64| {
        segments(&fs, &mem_dir())
            .into_iter()
            .rfind(|p| p.file_stem().unwrap().to_str().unwrap().parse::<u64>().unwrap() <= seq)
            .unwrap()
    };
    assert_eq!(holder(31), holder(36), "seqs 31-36 in one segment");
    let (_, rec) = Wal::open(cfg, as_dyn(&fs)).unwrap();
    assert_eq!(rec.last_seq, 36);
}

/// A compaction whose unlink of a segment fails keeps that segment and those after it
/// in the log's map, and the next snapshot's compaction removes them: none is left on
/// disk until a restart. (Taken out of the map all at once before the unlinks, so that
/// the writer never waits for them, they were forgotten there after a failure.)
#[test]
fn a_compaction_that_fails_midway_is_finished_by_the_next_one() {
    let fs = MemFs::new();
    let dir = mem_dir();
    let cfg = WalConfig { keep_snapshots: 1, ..small_cfg(MEM_DIR) };
    let (wal, _) = Wal::open(cfg, as_dyn(&fs)).unwrap();
    let last = append_many(&wal, 300);
    let before = segments(&fs, &dir);
    assert!(before.len() > 4, "{before:?}");
    fs.inject(rota::wal::Fault::UnlinkError);
    assert!(wal.write_snapshot(last, b"state").is_err(), "the unlink failure is reported");
    assert_eq!(segments(&fs, &dir), before, "nothing unlinked");
    let last = append_many(&wal, 1);
    wal.write_snapshot(last, b"state 2").unwrap();
    let after = segments(&fs, &dir);
    assert_eq!(after.len(), 1, "every covered segment removed by the next compaction: {after:?}");
    wal.shutdown().unwrap();
}

/// A covered segment already gone from the disk when compaction removes it (a removal
/// that took effect but reported an error, or an operator's hand) is done, not an
/// error: otherwise every later compaction failed on it, and every snapshot with it.
#[test]
fn a_compaction_finds_a_segment_already_removed_done() {
    let fs = MemFs::new();
    let dir = mem_dir();
    let cfg = WalConfig { keep_snapshots: 1, ..small_cfg(MEM_DIR) };
    let (wal, _) = Wal::open(cfg, as_dyn(&fs)).unwrap();
    let last = append_many(&wal, 300);
    let first = segments(&fs, &dir)[0].clone();
    rota::wal::Fs::remove(&fs, &first).unwrap();
    wal.write_snapshot(last, b"state").expect("the compaction finds it done");
    assert_eq!(segments(&fs, &dir).len(), 1);
    wal.shutdown().unwrap();
}
