//! How long a decision that accepts a lead waits for the lead index while a snapshot
//! copies it (`LeadIndex::entries`, which holds one part of the index locked at a
//! time). One thread copies an index of N open leads over and over, as snapshots do;
//! this thread meanwhile inserts and removes leads, as decisions do, and records how
//! long each insert took. Prints the insert latency percentiles for an index in 8
//! parts (dashmap's default on 2 CPUs) and in 256 (rota's).
//!
//! ```text
//! cargo run --release --example lead_index_snapshot -- 1000000
//! ```

use hdrhistogram::Histogram;
use rota::engine::lead_index::LeadIndex;
use rota::ids::{CategoryId, LeadId, ShardKey, TenantId, ZoneId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn run(parts: usize, n: usize) {
    let key = ShardKey {
        tenant: TenantId::new("t"),
        zone: ZoneId::new("bologna"),
        category: CategoryId::new("painting"),
    };
    let index = Arc::new(LeadIndex::with_parts(parts));
    for i in 0..n {
        index.insert(&key, &LeadId::new(format!("lead-{i:08}")));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let copier = {
        let (index, stop) = (index.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut copies = 0u32;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::hint::black_box(index.entries());
                copies += 1;
            }
            (copies, started.elapsed())
        })
    };
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    let started = Instant::now();
    let mut i = n;
    let mut blocked_ns = 0u64;
    while started.elapsed().as_secs() < 3 {
        let lead = LeadId::new(format!("lead-{i:08}"));
        let t = Instant::now();
        index.insert(&key, &lead);
        let took = t.elapsed().as_nanos() as u64;
        h.record(took).unwrap();
        if took > 50_000 {
            blocked_ns += took;
        }
        index.remove_if_at(&key, &lead);
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (copies, took) = copier.join().unwrap();
    println!(
        "{parts:>3} parts, {n} leads: {copies} copies ({:.0} ms each); insert p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us; {} inserts, {:.0} % of the time in inserts over 50 us",
        took.as_secs_f64() * 1e3 / copies.max(1) as f64,
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3,
        h.len(),
        blocked_ns as f64 / started.elapsed().as_nanos() as f64 * 100.0
    );
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    for parts in [8, 256] {
        run(parts, n);
    }
}
