//! WAL benchmarks: durable appends/s with group commit against one sync per
//! record, recovery speed, and the raw `fdatasync` latency of this disk.
//!
//! Run: `cargo bench --bench wal -- --measurement-time 5`. Data goes to a temp
//! dir under `target/tmp` (on the real disk, never tmpfs).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use crossbeam_channel::{bounded, Sender};
use rota::wal::{Fs, FsFile, OpenMode, RealFs, Replayed, Wal, WalConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAYLOAD_BYTES: usize = 64;

fn bench_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rota-wal-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("target/tmp is writable")
}

/// `producers` threads each append `each` single-record requests and wait for
/// every one to be durable. Returns the wall time of the whole run.
fn run_producers(wal: &Wal, producers: usize, each: usize) -> Duration {
    let started = Instant::now();
    std::thread::scope(|s| {
        for p in 0..producers {
            let wal = wal.clone();
            s.spawn(move || {
                for _ in 0..each {
                    wal.append_blocking(vec![(p as u8, vec![0x5a; PAYLOAD_BYTES])]).expect("append");
                }
            });
        }
    });
    started.elapsed()
}

/// `producers` logical producers (as actors would be), each keeping one request in
/// flight: its `on_durable` callback submits the next one. No thread per producer,
/// so this measures the log rather than the OS scheduler.
fn run_callbacks(wal: &Wal, producers: usize, each: usize) -> Duration {
    fn submit(wal: Wal, p: usize, left: usize, done: Sender<()>) {
        let next = wal.clone();
        let cb = Box::new(move |r: Result<std::ops::Range<u64>, rota::wal::WalError>| {
            r.expect("durable");
            if left > 1 {
                submit(next, p, left - 1, done);
            } else {
                done.send(()).expect("bench waits for every producer");
            }
        });
        wal.try_append(vec![(p as u8, vec![0x5a; PAYLOAD_BYTES])], cb)
            .expect("queue has room for every producer");
    }
    let (done_tx, done_rx) = bounded(producers);
    let started = Instant::now();
    for p in 0..producers {
        submit(wal.clone(), p, each, done_tx.clone());
    }
    for _ in 0..producers {
        done_rx.recv().expect("every producer finishes");
    }
    started.elapsed()
}

fn durable_appends(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_durable_append");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    // (mode, max requests per batch, preallocate, min_sync_interval_us). The log's own
    // group commit is measured with syncs as soon as possible (0); `_interval_300`
    // repeats two cases with the daemon's default spacing of syncs.
    let modes = [
        ("group_commit_threads", 4096, true, 0),
        ("group_commit_callbacks", 4096, true, 0),
        ("group_commit_callbacks_no_prealloc", 4096, false, 0),
        ("sync_per_record_threads", 1, true, 0),
        ("group_commit_threads_interval_300", 4096, true, 300),
        ("group_commit_callbacks_interval_300", 4096, true, 300),
    ];
    for producers in [1usize, 16, 256] {
        for (mode, max_batch, preallocate, interval) in modes {
            if producers == 1 && !mode.starts_with("group_commit_threads") {
                // One producer never has more than one record queued: already one sync each.
                continue;
            }
            let records = match (mode, producers) {
                ("sync_per_record_threads", p) | (_, p @ 1) => 1_000usize.max(p * 4),
                (_, p) => (p * 200).max(3_200),
            };
            let each = records / producers;
            let dir = bench_dir();
            let cfg = WalConfig {
                max_batch_requests: max_batch,
                preallocate,
                min_sync_interval_us: interval,
                ..WalConfig::new(dir.path())
            };
            let (wal, _) = Wal::open(cfg, Arc::new(RealFs)).expect("open");
            g.throughput(Throughput::Elements((each * producers) as u64));
            g.bench_function(BenchmarkId::new(mode, format!("{producers}_producers")), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            if mode.contains("callbacks") {
                                run_callbacks(&wal, producers, each)
                            } else {
                                run_producers(&wal, producers, each)
                            }
                        })
                        .sum()
                })
            });
            let s = wal.stats();
            eprintln!(
                "  {mode}/{producers}: {} records in {} syncs ({:.1} records/sync), mean sync {} us",
                s.records,
                s.syncs,
                s.records as f64 / s.syncs.max(1) as f64,
                s.sync_micros_total / s.syncs.max(1)
            );
            wal.shutdown().expect("shutdown");
        }
    }
    g.finish();
}

fn recovery(c: &mut Criterion) {
    const RECORDS: u64 = 1_000_000;
    let dir = bench_dir();
    let cfg = WalConfig::new(dir.path());
    {
        let (wal, _) = Wal::open(cfg.clone(), Arc::new(RealFs)).expect("open");
        for _ in 0..RECORDS / 1000 {
            let batch = (0..1000).map(|i| ((i % 13) as u8, vec![0x33; PAYLOAD_BYTES])).collect();
            wal.append_blocking(batch).expect("append");
        }
        wal.shutdown().expect("shutdown");
    }
    let mut g = c.benchmark_group("wal_recovery");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.throughput(Throughput::Elements(RECORDS));
    g.bench_function("open_with_1M_records_64B", |b| {
        b.iter(|| {
            let mut n = 0u64;
            let mut bytes = 0usize;
            let (wal, rec) = Wal::open_with(cfg.clone(), Arc::new(RealFs), |r| {
                if let Replayed::Record { payload, .. } = r {
                    n += 1;
                    bytes += payload.len();
                }
            })
            .expect("recovery");
            assert_eq!((n, rec.records_replayed), (RECORDS, RECORDS));
            wal.shutdown().expect("shutdown");
            bytes
        })
    });
    g.finish();
}

/// One 64-byte write plus `fdatasync`, appending (the file grows each time) or
/// overwriting inside preallocated space.
fn fdatasync_latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("fdatasync_64B");
    g.sample_size(20);
    for preallocated in [false, true] {
        let dir = bench_dir();
        let path = dir.path().join("sync-probe");
        let mut file: Box<dyn FsFile> = RealFs.open(&path, OpenMode::Create).expect("create");
        if preallocated {
            file.allocate(256 << 20).expect("allocate");
            file.sync_data().expect("sync");
        }
        let mut offset = 0u64;
        let name = if preallocated { "preallocated" } else { "appending" };
        g.bench_function(name, |b| {
            b.iter(|| {
                file.write_at(offset, &[7u8; PAYLOAD_BYTES]).expect("write");
                file.sync_data().expect("sync");
                offset = (offset + PAYLOAD_BYTES as u64) % (256 << 20);
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = fdatasync_latency, durable_appends, recovery
}
criterion_main!(benches);
