//! Kill -9 loop: a child process appends and reports durable acks; the parent
//! kills it at a random moment and checks every acknowledged record survived.
//!
//! `ROTA_CRASH_CYCLES=N` runs N cycles instead of 3.

mod wal_support;

use rota::wal::{RealFs, Wal, WalConfig};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wal_support::Rng;

const CHILD_ENV: &str = "ROTA_WAL_CRASH_CHILD_DIR";
const TEST_NAME: &str = "killed_writer_loses_no_acknowledged_record";
const PRODUCERS: u64 = 4;

fn cfg(dir: &Path) -> WalConfig {
    // Small segments so kills also land around rollovers.
    WalConfig { segment_bytes: 256 << 10, ..WalConfig::new(dir) }
}

/// Payload: producer id and its own counter, so the parent can check each
/// producer's records kept their order.
fn encode(producer: u64, counter: u64) -> Vec<u8> {
    let mut v = rmp_serde::to_vec(&(producer, counter)).expect("a pair of u64 always encodes");
    v.resize(64, 0xab);
    v
}

fn decode(payload: &[u8]) -> (u64, u64) {
    let mut slice = payload;
    rmp_serde::from_read(&mut slice).expect("payload written by the child")
}

/// Child mode: append forever from several threads; print each durable ack.
fn child(dir: &Path) -> ! {
    let (wal, _) = Wal::open(cfg(dir), Arc::new(RealFs)).expect("child recovery");
    let out = Arc::new(parking_lot::Mutex::new(std::io::stdout()));
    std::thread::scope(|s| {
        for p in 0..PRODUCERS {
            let (wal, out) = (wal.clone(), out.clone());
            s.spawn(move || {
                for counter in 0.. {
                    let range = wal.append_blocking(vec![(p as u8, encode(p, counter))]).expect("append");
                    let mut out = out.lock();
                    // A kill between the ack and this line only hides an ack; never invents one.
                    writeln!(out, "ack {}", range.start).expect("parent reads stdout");
                    out.flush().expect("parent reads stdout");
                }
            });
        }
    });
    unreachable!("producers loop until killed")
}

#[test]
fn killed_writer_loses_no_acknowledged_record() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
    }
    let cycles: u64 = std::env::var("ROTA_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let exe = std::env::current_exe().unwrap();
    let mut max_acked = 0u64;
    for cycle in 0..cycles {
        let mut child = Command::new(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_ack, acking) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(seq) = line.strip_prefix("ack ").and_then(|s| s.parse::<u64>().ok()) {
                    if acked.is_empty() {
                        let _ = first_ack.send(());
                    }
                    acked.push(seq);
                }
            }
            acked
        });
        // Killed while it acknowledges: once the first ack is out (however long the
        // child takes to start), after a random pause that only decides when; nothing
        // is asserted about time.
        let _ = acking.recv_timeout(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(rng.below(250)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        max_acked = max_acked.max(acked.iter().copied().max().unwrap_or(0));

        let (wal, rec) = Wal::open(cfg(&dir), Arc::new(RealFs))
            .unwrap_or_else(|e| panic!("seed {seed} cycle {cycle}: recovery refused: {e}"));
        assert!(
            rec.last_seq >= max_acked,
            "seed {seed} cycle {cycle}: seq {max_acked} acknowledged, log ends at {}",
            rec.last_seq
        );
        // Seqs run on without gaps from 1 and each producer's counters only grow.
        let mut last_counter = [None::<u64>; PRODUCERS as usize];
        for (i, r) in rec.records.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1, "seed {seed} cycle {cycle}");
            let (p, counter) = decode(&r.payload);
            assert_eq!(p, r.kind as u64);
            if let Some(prev) = last_counter[p as usize] {
                // Counters restart per child; within one child they increase.
                assert!(counter > prev || counter == 0, "seed {seed}: producer {p} out of order");
            }
            last_counter[p as usize] = Some(counter);
        }
        println!(
            "cycle {cycle}: {} acks seen, log holds {} records, torn tail {:?}",
            acked.len(),
            rec.last_seq,
            rec.torn_tail
        );
        wal.shutdown().unwrap();
    }
    assert!(max_acked > 0, "seed {seed}: the child never acknowledged anything");
}
