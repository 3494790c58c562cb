//! `verify`, `dump` and `repair`.

mod wal_support;

use rota::wal::tools::{dump, repair, verify};
use rota::wal::{MemFs, Wal, WalError, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use std::path::{Path, PathBuf};
use wal_support::*;

const N: u64 = 10;

fn log_with_records() -> (MemFs, PathBuf, Vec<u8>) {
    let fs = MemFs::new();
    let (wal, _) = Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).unwrap();
    for i in 1..=N {
        wal.append_blocking(vec![(4, rmp_serde::to_vec_named(&serde_json::json!({"lead": i})).unwrap())])
            .unwrap();
    }
    wal.shutdown().unwrap();
    let seg = segments(&fs, Path::new(MEM_DIR))[0].clone();
    let bytes = fs.file_bytes(&seg).unwrap();
    (fs, seg, bytes)
}

fn record_offset(bytes: &[u8], seq: u64) -> u64 {
    let mut at = SEGMENT_HEADER_LEN;
    for _ in 1..seq {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += RECORD_HEADER_LEN + len;
    }
    at as u64
}

#[test]
fn verify_reports_counts_and_seq_range_of_a_clean_log() {
    let (fs, _, _) = log_with_records();
    let report = verify(&fs, Path::new(MEM_DIR)).unwrap();
    assert!(report.is_recoverable());
    assert_eq!((report.records, report.first_seq, report.last_seq), (N, Some(1), Some(N)));
    let text = report.to_string();
    assert!(text.contains("records: 10 (seq 1..=10)") && text.contains("ok: recovery will accept"), "{text}");
}

#[test]
fn verify_finds_torn_tails_and_middle_corruption_without_changing_anything() {
    let (fs, seg, bytes) = log_with_records();
    fs.truncate(&seg, bytes.len() as u64 - 3).unwrap();
    let report = verify(&fs, Path::new(MEM_DIR)).unwrap();
    assert!(report.is_recoverable());
    assert_eq!(report.torn_tail.as_ref().map(|t| t.offset), Some(record_offset(&bytes, N)));
    assert_eq!(fs.file_bytes(&seg).unwrap().len(), bytes.len() - 3, "verify is read-only");

    let (fs, seg, bytes) = log_with_records();
    let at = record_offset(&bytes, 4);
    fs.flip_bit(&seg, at + 30, 0).unwrap();
    let report = verify(&fs, Path::new(MEM_DIR)).unwrap();
    assert!(!report.is_recoverable());
    match &report.corruption {
        Some(WalError::Corrupt { offset, expected_seq, .. }) => assert_eq!((*offset, *expected_seq), (at, 4)),
        other => panic!("{other:?}"),
    }
    assert!(report.to_string().contains("CORRUPT"));
}

#[test]
fn dump_prints_one_line_per_record_with_json_for_messagepack_payloads() {
    let (fs, _, _) = log_with_records();
    let mut out = Vec::new();
    let n = dump(&fs, Path::new(MEM_DIR), 3, 4, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!((n, lines.len()), (4, 4), "{text}");
    assert!(lines[0].starts_with("seq=3 type=4 len="), "{text}");
    assert!(lines[0].contains("segment=00000000000000000001.wal offset="), "{text}");
    assert!(lines[0].contains(r#"json={"lead":3}"#), "{text}");
    assert!(lines[3].starts_with("seq=6 "), "{text}");
}

#[test]
fn repair_cuts_at_the_first_bad_record_after_keeping_a_copy() {
    let (fs, seg, bytes) = log_with_records();
    let at = record_offset(&bytes, 6);
    fs.flip_bit(&seg, at + 2, 3).unwrap();
    let damaged = fs.file_bytes(&seg).unwrap();
    assert!(Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).is_err(), "recovery refuses it first");

    let mut out = Vec::new();
    let report = repair(&fs, Path::new(MEM_DIR), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(report.backups.len(), 1, "{text}");
    assert_eq!(fs.file_bytes(&report.backups[0]).unwrap(), damaged, "the copy holds the damaged original");
    assert!(report.backups[0].to_string_lossy().ends_with(".wal.corrupt-1"));
    assert_eq!((report.records_kept, report.last_seq), (5, Some(5)), "{text}");
    assert!(text.contains(&format!("at byte {at}, seq 6 onwards")), "{text}");

    let (_, rec) = Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).unwrap();
    assert_eq!(rec.last_seq, 5);
    assert!(verify(&fs, Path::new(MEM_DIR)).unwrap().is_recoverable());
}

#[test]
fn repair_sets_later_segments_aside_when_an_older_one_is_damaged() {
    let fs = MemFs::new();
    let (wal, _) = Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).unwrap();
    for i in 1..=200u64 {
        wal.append_blocking(vec![(1, payload(i, 100))]).unwrap();
    }
    wal.shutdown().unwrap();
    let segs = segments(&fs, Path::new(MEM_DIR));
    assert!(segs.len() >= 4);
    let bytes = fs.file_bytes(&segs[1]).unwrap();
    let first: u64 = segs[1].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let at = record_offset(&bytes, 3);
    fs.flip_bit(&segs[1], at + 40, 5).unwrap();

    let mut out = Vec::new();
    let report = repair(&fs, Path::new(MEM_DIR), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    // One copy of the damaged segment plus every later segment set aside.
    assert_eq!(report.backups.len(), 1 + segs.len() - 2, "{text}");
    assert_eq!(report.last_seq, Some(first + 1), "{text}");
    assert_eq!(segments(&fs, Path::new(MEM_DIR)), segs[..2].to_vec());
    let (wal, rec) = Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).unwrap();
    assert_eq!(rec.last_seq, first + 1);
    assert_eq!(wal.append_blocking(vec![(1, vec![])]).unwrap().start, first + 2);
}

#[test]
fn verify_accepts_a_log_written_over_recycled_segments_and_lists_the_files_kept_for_reuse() {
    let fs = MemFs::new();
    let cfg = rota::wal::WalConfig {
        preallocate: true,
        recycle_segments: 4,
        keep_snapshots: 1,
        ..small_cfg(MEM_DIR)
    };
    let (wal, _) = Wal::open(cfg, as_dyn(&fs)).unwrap();
    append_many(&wal, 300);
    wal.write_snapshot(300, b"state at 300").unwrap();
    // Rollovers until segments made from recycled files are in use (the spare is
    // prepared on its own thread), then past another rollover.
    let mut n = 0;
    while wal.stats().segments_reused < 2 {
        append_many(&wal, 1);
        n += 1;
        assert!(n < 5_000, "no segment was made from a recycled file: {:?}", wal.stats());
    }
    append_many(&wal, 40);
    let last = wal.last_seq();
    wal.shutdown().unwrap();

    let report = verify(&fs, Path::new(MEM_DIR)).unwrap();
    assert!(report.is_recoverable(), "{report}");
    let first = report.first_seq.expect("records kept");
    assert!(first <= 301, "records after the snapshot are kept: {report}");
    assert_eq!((report.last_seq, report.records), (Some(last), last - first + 1), "{report}");
    assert!(report.torn_tail.is_none(), "{report}");
    let text = report.to_string();
    assert!(!report.kept_for_reuse.is_empty() && text.contains("kept for reuse"), "{text}");
    for p in &report.kept_for_reuse {
        assert!(text.contains(p.file_name().unwrap().to_str().unwrap()), "{text}");
    }
}

/// `rota streams verify`: each tenant's stream history, its range, and the first
/// damage (exit 1), read-only.
#[test]
fn streams_verify_reports_each_tenants_history_and_finds_damage_without_changing_anything() {
    use rota::engine::{hub::StreamHub, spill::Spill};
    use rota::wal::{Fs, OpenMode, RealFs};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("streams");
    let fs: std::sync::Arc<dyn Fs> = std::sync::Arc::new(RealFs);
    for tenant in ["acme", "globex"] {
        let spill = Spill::open(fs.clone(), &root, &rota::ids::TenantId::new(tenant), 64 << 10, 100_000);
        let hub = StreamHub::with_spill(10, Some(spill.clone()));
        hub.publish((1..=400u64).map(|i| rota::protocol::StreamEvent::LeadClosed {
            lead: rota::ids::LeadId::new(format!("L{i}")),
            at: i as i64,
        }));
        spill.drain();
    }
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rota"))
            .args(["streams", "verify"])
            .arg(&root)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap())
    };
    let (code, text) = run();
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.matches("events 1-390").count(), 2, "{text}");
    assert!(text.contains("acme (tenant \"acme\")") && text.contains("globex (tenant \"globex\")"), "{text}");
    // A flipped byte in the middle of acme's second segment.
    let dir = root.join("acme");
    let mut segs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "spill"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "{segs:?}");
    let mut bytes = std::fs::read(&segs[1]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    RealFs.open(&segs[1], OpenMode::Existing).unwrap().write_at(0, &bytes).unwrap();
    let before: Vec<Vec<u8>> = segs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let (code, text) = run();
    assert_eq!(code, Some(1), "{text}");
    let name = segs[1].file_name().unwrap().to_str().unwrap();
    assert!(text.contains(&format!("damaged: {name}: bad or torn entry at offset")), "{text}");
    assert_eq!(text.matches("events 1-390").count(), 1, "globex still whole: {text}");
    let after: Vec<Vec<u8>> = segs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(before, after, "verify changes nothing");
}

/// `verify` and `repair` look at what recovery reads. Damage in a segment kept only
/// for the older snapshot is not reported as unrecoverable, and `repair` does not cut
/// there: it used to, setting aside every later segment, and with them every record
/// after the newest snapshot, from a log that recovery accepted as it was.
#[test]
fn damage_before_the_newest_snapshot_neither_fails_verify_nor_costs_repair_the_newer_records() {
    let fs = MemFs::new();
    let dir = Path::new(MEM_DIR);
    let (wal, _) = Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).unwrap();
    append_many(&wal, 50);
    wal.write_snapshot(50, b"state at 50").unwrap();
    append_many(&wal, 100);
    wal.write_snapshot(150, b"state at 150").unwrap();
    append_many(&wal, 50);
    wal.shutdown().unwrap();
    // Seq 70: after the older snapshot, before the newer one.
    let mut listing = Vec::new();
    assert_eq!(dump(&fs, dir, 70, 1, &mut listing).unwrap(), 1);
    let line = String::from_utf8(listing).unwrap();
    let field = |name: &str| line.split_whitespace().find_map(|f| f.strip_prefix(name)).unwrap().to_string();
    let seg = dir.join(field("segment="));
    let offset: u64 = field("offset=").parse().unwrap();
    fs.flip_bit(&seg, offset + RECORD_HEADER_LEN as u64 + 10, 0).unwrap();

    let report = verify(&fs, dir).unwrap();
    assert!(report.is_recoverable(), "{report}");
    assert_eq!((report.first_seq, report.last_seq), (Some(151), Some(200)), "{report}");
    let mut out = Vec::new();
    let repaired = repair(&fs, dir, &mut out).unwrap();
    assert!(repaired.backups.is_empty(), "nothing to repair: {}", String::from_utf8_lossy(&out));
    let (_, rec) = Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).unwrap();
    assert_eq!((rec.snapshot_seq, rec.records.len(), rec.last_seq), (Some(150), 50, 200));
}

/// A second process on the same directory would cut the first one's tail as torn and
/// write over its records: the directory is taken by the first `Wal::open` until that
/// log is shut down, and `repair` is refused meanwhile.
#[test]
fn a_second_open_of_a_directory_in_use_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    // Refused at once here; a daemon waits `lock_wait_ms` (15 s) for a predecessor.
    let cfg = rota::wal::WalConfig { lock_wait_ms: 0, ..small_cfg(dir.path().join("wal")) };
    let real: std::sync::Arc<dyn rota::wal::Fs> = std::sync::Arc::new(rota::wal::RealFs);
    let (wal, _) = Wal::open(cfg.clone(), real.clone()).unwrap();
    wal.append_blocking(vec![(2, payload(1, 100))]).unwrap();
    let e = Wal::open(cfg.clone(), real.clone()).map(|_| ()).unwrap_err();
    assert!(matches!(e, WalError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("in use by another process"), "{e}");
    let e = repair(&rota::wal::RealFs, &cfg.dir, &mut Vec::new()).unwrap_err();
    assert!(matches!(e, WalError::InUse { .. }), "{e}");
    wal.shutdown().unwrap();
    let (_, rec) = Wal::open(cfg, real).expect("free again once the first log is shut down");
    assert_eq!(rec.last_seq, 1);
}

/// The log tools refuse a directory that holds no log (the data directory instead of
/// its `wal` subdirectory, a mistyped path) instead of reporting an empty log as
/// sound, name where the log likely is, and `repair` creates nothing there.
#[test]
fn the_wal_tools_refuse_a_directory_that_holds_no_log_and_point_at_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("wal")).unwrap();
    let fs: std::sync::Arc<dyn rota::wal::Fs> = std::sync::Arc::new(rota::wal::RealFs);
    let (wal, _) = Wal::open(rota::wal::WalConfig::new(data.join("wal")), fs).unwrap();
    append_many(&wal, 3);
    wal.shutdown().unwrap();
    let run = |args: &[&str], dir: &std::path::Path| {
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_rota")).args(args).arg(dir).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["wal", "verify"], &data);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("holds no log") && err.contains(&format!("did you mean {}", data.join("wal").display())),
        "{err}"
    );
    let missing = tmp.path().join("typo");
    let (code, err) =
        run(&["wal", "repair", "--yes-i-understand-records-after-the-damage-are-dropped"], &missing);
    assert_eq!(code, Some(2), "{err}");
    assert!(!missing.exists(), "repair created {}", missing.display());
    let (code, err) = run(&["wal", "verify"], &data.join("wal"));
    assert_eq!(code, Some(0), "{err}");
}

/// `rota token hash` reads the token from standard input (out of the shell's history
/// and the process list), and refuses an empty one; the argument form gives the same.
#[test]
fn token_hash_reads_the_token_from_standard_input_and_refuses_an_empty_one() {
    use std::io::Write;
    let hash = |arg: Option<&str>, input: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rota"))
            .args(["token", "hash"])
            .args(arg)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let expected = format!("{}\n", rota::config::hex(&rota::config::hash_token("s3cret")));
    assert_eq!(hash(None, "s3cret"), (Some(0), expected.clone(), String::new()));
    assert_eq!(hash(None, "s3cret\n").1, expected, "the line ending is not part of the token");
    assert_eq!(hash(Some("s3cret"), "").1, expected);
    let (code, out, err) = hash(None, "\n");
    assert_eq!((code, out.as_str()), (Some(2), ""), "{err}");
    assert!(err.contains("no token on standard input"), "{err}");
    let (code, out, err) = hash(Some(""), "");
    assert_eq!((code, out.as_str()), (Some(2), ""), "an empty argument: {err}");
}
