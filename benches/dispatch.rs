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
use rota::ids::{CategoryId, ClientId, LeadId, Millis, ProId, ShardKey, TenantId, ZoneId, DAY_MS};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const T0: Millis = 1_795_424_400_000;

fn key() -> ShardKey {
    ShardKey {
        tenant: TenantId::new("t"),
        zone: ZoneId::new("bologna"),
        category: CategoryId::new("painting"),
    }
}

fn policy(mode: &str) -> Arc<Policy> {
    let text = match mode {
        "matched" => {
            "tenant = \"t\"\nmode = \"matched\"\n[leads]\noffer_fanout = 4\nresponse_window_s = 259200\n\
             duplicate_window_s = 0\n[money]\ncharge_on = \"never\"\n"
        }
        _ => {
            "tenant = \"t\"\nmode = \"auto_buy\"\n[leads]\nduplicate_window_s = 0\n[autobuy]\ngroup_size = 4\n\
             [money]\ncharge_on = \"dispatch\"\nflat_price_credits = 10\n\
             [pricing]\ntenant_factor_permille = 1000\nmin_price_credits = 1\nmax_price_credits = 40\n\
             credit_value_cents = 100\nchat_only_discount_permille = 300\nthin_details_discount_permille = 150\n\
             far_away_discount_permille = 200\nfar_away_km = 30\nproposals_ema_permille = 50\n\
             [pricing.default_category]\navg_job_value_cents = 5000\nconversion_permille = 200\n\
             avg_proposals_milli = 4000\n"
        }
    };
    Arc::new(Policy::from_toml(text).expect("bench policy is valid"))
}

fn all_week() -> WeeklyWindows {
    let days =
        [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun];
    WeeklyWindows {
        time_zone: "Europe/Rome".into(),
        intervals: days.iter().map(|&day| WeeklyInterval { day, start_min: 0, end_min: 1440 }).collect(),
    }
}

fn shard(mode: &str, pros: usize, paused_every: usize) -> Shard {
    let mut s = Shard::new(key(), policy(mode));
    for i in 0..pros {
        let pro = Pro {
            id: ProId::new(format!("pro-{i}")),
            categories: vec![CategoryId::new("painting")],
            zones: vec![ZoneId::new("bologna")],
            base: Some(GeoPoint { lat: 44.49, lon: 11.34 }),
            radius_km: Some(50.0),
            quality: Quality {
                reviews: (i % 50) as u32,
                rating_centi: 400,
                projects: 3,
                profile_permille: 800,
            },
            refuses: vec![],
            availability: Availability {
                paused_until: (paused_every > 0 && i % paused_every == 0).then_some(Millis::MAX / 4),
                vacation: None,
                schedule: Some(all_week()),
            },
            autobuy: vec![AutoBuyConfig {
                name: "weekly".into(),
                zones: vec![ZoneId::new("bologna")],
                categories: vec![CategoryId::new("painting")],
                weekly_budget_credits: 1000,
                max_price_credits: None,
                active: true,
                paused_until: None,
            }],
        };
        let d = s.decide(T0, &Command::UpsertPro { pro }, &Unlimited).expect("valid pro");
        for ev in &d.events {
            s.apply(ev);
        }
    }
    s
}

fn lead(n: u64, now: Millis) -> Lead {
    Lead {
        id: LeadId::new(format!("lead-{n}")),
        category: CategoryId::new("painting"),
        zone: ZoneId::new("bologna"),
        location: Some(GeoPoint { lat: 44.50, lon: 11.35 }),
        description: "Tinteggiatura di un appartamento di 80 mq, due camere".into(),
        details: BTreeMap::from([("rooms".into(), "3".into())]),
        attributes: vec![],
        client: Client {
            id: ClientId::new(format!("client-{n}")),
            name: "Anna Rossi".into(),
            phone: "+39 333 1234567".into(),
            phone_verified: true,
            contact: ContactPrefs { call: true, whatsapp: false, chat: true },
            address: None,
            pro_id: None,
        },
        direct: vec![],
        kind: JobKind::Match,
        created_at: now,
    }
}

/// Closes and forgets every lead (outside the timed section).
fn drain(s: &mut Shard, now: &mut Millis) {
    for _ in 0..2 {
        *now += 30 * DAY_MS;
        let d = s.decide(*now, &Command::Tick, &Unlimited).expect("tick never fails");
        for ev in &d.events {
            s.apply(ev);
        }
    }
}

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
                            let leads: Vec<Command> =
                                (0..batch).map(|i| Command::PublishLead { lead: lead(n + i, now) }).collect();
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
                        let leads: Vec<Command> =
                            (0..batch).map(|i| Command::PublishLead { lead: lead(n + i, now) }).collect();
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
