//! Ledger and pricing micro-benchmarks.
//!
//! Run: `cargo bench --bench ledger` (release profile); medians go to
//! BENCHMARKS.md under "Ledger and pricing".

use criterion::{criterion_group, criterion_main, Criterion};
// std's black_box, and `iter` closures return (): criterion 0.5 without its
// `real_blackbox` feature black-boxes values (including what an `iter` closure
// returns) by copying them byte by byte with volatile reads, which costs more
// than the ledger operation itself.
use rota::ids::{ProId, TenantId};
use rota::ledger::{CreditFact, Ledger, LedgerEvent, OpId};
use rota::pricing::{price, CategoryStats, PricingPolicy, RiskInputs};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn op_ids(prefix: &str, n: u64) -> Vec<OpId> {
    // Short ids stay inline in SmolStr, like `charge:<lead>:<pro>` for short ids.
    (0..n).map(|i| OpId::new(format!("{prefix}:{i}"))).collect()
}

fn funded() -> (Ledger, TenantId, ProId) {
    let (t, p) = (TenantId::new("acme"), ProId::new("pro-1"));
    let l = Ledger::new();
    l.grant(OpId::new("grant"), &t, &p, u64::MAX / 2).unwrap();
    (l, t, p)
}

fn ledger(c: &mut Criterion) {
    let mut g = c.benchmark_group("ledger");

    // A new charge: lookup, lock, op-id check, balance check, apply, register.
    // The op ids are built outside the timed loop.
    g.bench_function("charge", |b| {
        b.iter_custom(|iters| {
            let (l, t, p) = funded();
            let ids = op_ids("c", iters);
            let start = Instant::now();
            for id in ids {
                black_box(l.charge(id, &t, &p, 3).unwrap());
            }
            start.elapsed()
        })
    });

    // Charges spread over 10,000 pros, each with a small op-id registry: the
    // realistic shape (the `charge` case above grows one pro's registry).
    g.bench_function("charge_10k_pros", |b| {
        let t = TenantId::new("acme");
        let pros: Vec<ProId> = (0..10_000).map(|i| ProId::new(format!("pro-{i}"))).collect();
        b.iter_custom(|iters| {
            let l = Ledger::new();
            for p in &pros {
                l.grant(OpId::new("grant"), &t, p, u64::MAX / 2).unwrap();
            }
            let ids = op_ids("c", iters);
            let start = Instant::now();
            for (i, id) in ids.into_iter().enumerate() {
                black_box(l.charge(id, &t, &pros[i % pros.len()], 3).unwrap());
            }
            start.elapsed()
        })
    });

    // A retried charge answered from the op-id registry.
    g.bench_function("charge_replayed", |b| {
        let (l, t, p) = funded();
        let id = OpId::new("charge:l1:pro-1");
        l.charge(id.clone(), &t, &p, 3).unwrap();
        b.iter(|| {
            black_box(l.charge(id.clone(), &t, &p, 3).unwrap());
        })
    });

    // The refused path: not enough credits.
    g.bench_function("charge_insufficient", |b| {
        let (l, t, p) = funded();
        let id = OpId::new("charge:l1:pro-1");
        b.iter(|| {
            black_box(l.charge(id.clone(), &t, &p, u64::MAX).unwrap_err());
        })
    });

    // Chat-only response: hold then capture.
    g.bench_function("hold_capture", |b| {
        b.iter_custom(|iters| {
            let (l, t, p) = funded();
            let holds = op_ids("h", iters);
            let caps = op_ids("k", iters);
            let start = Instant::now();
            for (h, k) in holds.iter().zip(caps) {
                l.hold(h.clone(), &t, &p, 3).unwrap();
                black_box(l.capture(k, &t, &p, h).unwrap());
            }
            start.elapsed()
        })
    });

    // WAL replay of a charge event.
    g.bench_function("apply_charge_event", |b| {
        b.iter_custom(|iters| {
            let (t, p) = (TenantId::new("acme"), ProId::new("pro-1"));
            let events: Vec<_> = op_ids("c", iters)
                .into_iter()
                .map(|op| LedgerEvent::Credit {
                    op,
                    tenant: t.clone(),
                    pro: p.clone(),
                    fact: CreditFact::Charged { amount: 3, topup: None },
                })
                .collect();
            let l = Ledger::new();
            let start = Instant::now();
            for e in &events {
                l.apply(e);
            }
            start.elapsed()
        })
    });

    // Two threads charging the same pro: the per-account lock under contention
    // (and the cross-core cache traffic of section 6). Time per charge.
    g.bench_function("charge_same_pro_2_threads", |b| {
        b.iter_custom(|iters| {
            let (l, t, p) = funded();
            let half = iters.div_ceil(2);
            let ids = [op_ids("a", half), op_ids("b", half)];
            let start = Instant::now();
            std::thread::scope(|s| {
                for ids in ids {
                    let (l, t, p) = (&l, &t, &p);
                    s.spawn(move || {
                        for id in ids {
                            black_box(l.charge(id, t, p, 3).unwrap());
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

fn pricing(c: &mut Criterion) {
    let policy: PricingPolicy = toml::from_str(
        r#"
        tenant_factor_permille = 1100
        min_price_credits = 1
        max_price_credits = 40
        credit_value_cents = 100
        chat_only_discount_permille = 300
        thin_details_discount_permille = 150
        far_away_discount_permille = 200
        far_away_km = 30
        proposals_ema_permille = 50
        [default_category]
        avg_job_value_cents = 50000
        conversion_permille = 200
        avg_proposals_milli = 4000
        "#,
    )
    .expect("the bench policy is valid TOML");
    let pricing = policy.validate().expect("the bench policy is valid");
    let stats =
        CategoryStats { avg_job_value_cents: 73_450, conversion_permille: 187, avg_proposals_milli: 4_321 };
    let risk = RiskInputs { chat_only: true, thin_details: false, distance_m: Some(42_000) };
    c.bench_function("pricing/price", |b| {
        b.iter(|| {
            black_box(price(black_box(&stats), black_box(&risk), &pricing));
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = ledger, pricing
}
criterion_main!(benches);
