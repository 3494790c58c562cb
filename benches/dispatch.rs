//! The dispatch decision: `decide` + `apply` of one `PublishLead` on a shard of 10, 1,000
//! and 100,000 pros, in matched mode (fanout 4) and auto-buy mode (groups of 4, R11
//! pricing from category statistics, budget checks per candidate), with
//! most pros eligible (every pro has a weekly schedule covering
//! the whole week, so the schedule check runs). Two variants: `all` (every pro
//! eligible) and `paused10` (one pro in ten paused for good).
//!
//! Run: `cargo bench --bench dispatch -- --measurement-time 3`
//!
//! Leads accumulate in the shard while measuring; every 4,096 leads the shard is ticked
//! past their lifetime and retention (outside the timed section) so its size stays
//! bounded and every measured decision sees the same kind of shard.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rota::core::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

#[path = "support/dispatch_setup.rs"]
mod setup;
use setup::*;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch_decision");
    // `all`: every pro eligible; `paused10`: one pro in ten paused for good.
    for (variant, paused_every) in [("all", 0usize), ("paused10", 10)] {
        for mode in ["matched", "auto_buy"] {
            for pros in [10usize, 1_000, 100_000] {
                let mut s = shard(mode, pros, paused_every);
                let mut now = T0;
                let mut n = 0u64;
                group.bench_with_input(BenchmarkId::new(format!("{mode}/{variant}"), pros), &pros, |b, _| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        let mut left = iters;
                        while left > 0 {
                            let batch = left.min(4096);
                            let leads: Vec<Command> = (0..batch)
                                .map(|i| Command::PublishLead { lead: lead(n + i, now).into() })
                                .collect();
                            n += batch;
                            let start = Instant::now();
                            for cmd in &leads {
                                let d = s.decide(now, cmd, &Unlimited).expect("the bench lead is valid");
                                for ev in &d.events {
                                    s.apply(ev);
                                }
                                black_box(&d.reply);
                            }
                            total += start.elapsed();
                            drop(leads);
                            drain(&mut s, &mut now);
                            left -= batch;
                        }
                        total
                    });
                });
            }
        }
    }
    group.finish();
}

/// The decision alone (`decide`), which is what answers a publish; `apply` runs after
/// each decision, untimed, so the shard evolves as in `bench`. Each decision is timed
/// on its own (two clock reads, ~40 ns, are included) and also recorded in a
/// histogram whose median and p99 are printed at the end, since criterion reports a
/// mean estimate.
fn bench_decide_only(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch_decide_only");
    let mut summary = Vec::new();
    for mode in ["matched", "auto_buy"] {
        for pros in [10usize, 1_000, 100_000] {
            let mut s = shard(mode, pros, 0);
            let mut now = T0;
            let mut n = 0u64;
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("3 significant digits is valid");
            group.bench_with_input(BenchmarkId::new(mode, pros), &pros, |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let batch = left.min(4096);
                        let leads: Vec<Command> = (0..batch)
                            .map(|i| Command::PublishLead { lead: lead(n + i, now).into() })
                            .collect();
                        n += batch;
                        for cmd in &leads {
                            let start = Instant::now();
                            let d = s.decide(now, cmd, &Unlimited).expect("the bench lead is valid");
                            let took = start.elapsed();
                            total += took;
                            let _ = hist.record(took.as_nanos() as u64);
                            for ev in &d.events {
                                s.apply(ev);
                            }
                            black_box(&d.reply);
                        }
                        drop(leads);
                        drain(&mut s, &mut now);
                        left -= batch;
                    }
                    total
                });
            });
            if hist.is_empty() {
                continue; // filtered out on the command line
            }
            summary.push(format!(
                "decide {mode:>8} {pros:>6} pros: p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us ({} decisions)",
                hist.value_at_quantile(0.5) as f64 / 1000.0,
                hist.value_at_quantile(0.99) as f64 / 1000.0,
                hist.value_at_quantile(0.999) as f64 / 1000.0,
                hist.len()
            ));
        }
    }
    group.finish();
    for line in summary {
        eprintln!("{line}");
    }
}

criterion_group!(benches, bench, bench_decide_only);
criterion_main!(benches);
