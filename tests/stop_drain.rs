//! A graceful stop runs each shard's due work before the final snapshot (a Tick
//! queued behind whatever its actor has to do). It used to do so one shard after
//! another, waiting for each tick's record to be durable before asking the next: a
//! cross-thread hop and a sync per shard, so a tenant of tens of thousands of shards
//! ran past `shutdown_timeout_ms` and stopped without its final snapshot. Every
//! shard is asked at once now, and their records share the log's group commits.

mod engine_support;

use engine_support::{acme_config, in_system, ok, T0};
use rota::engine::Engine;
use rota::wal::MemFs;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ZONES: usize = 24;
const DAY: i64 = 24 * 3600 * 1000;

/// Generous bound on a wait, never an assertion about speed: a stop that never gets
/// there fails the test instead of hanging it.
const DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn a_stop_asks_every_shard_for_its_due_work_at_once_not_one_sync_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = acme_config(dir.path(), "shopify-experts.toml", "shopify-experts", &[]);
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(cfg, handle).expect("engine starts");
        let zones: Vec<String> = (0..ZONES).map(|i| format!("z{i}")).collect();
        for p in ["e1", "e2", "e3"] {
            ok(
                &e,
                json!({"type": "upsert_pro", "pro": {"id": p, "categories": ["painting"], "zones": zones}}),
            )
            .await;
        }
        // A lead in every zone, each offered with a response window of 3 days (R15).
        for (i, zone) in zones.iter().enumerate() {
            ok(&e, json!({"type": "publish_lead", "lead": {
                "id": format!("L{i}"), "category": "painting", "zone": zone,
                "description": "Migrate a store to a new theme with custom sections", "details": {"pages": "12"},
                "client": {"id": format!("c{i}"), "name": "Ana", "phone": "+39 333 000 000",
                           "phone_verified": true, "contact": {"chat": true}},
                "created_at": T0
            }}))
            .await;
        }
        // The windows end on the clock, with nothing run yet: every shard has due work.
        e.inner.clock.advance_to(T0 + 4 * DAY);
        // The disk holds every sync: a stop asking one shard at a time waits on the
        // first tick's record, and no other shard has run its due work meanwhile;
        // asked at once, every shard decides while the first sync waits.
        let hold = fs.hold_syncs();
        let stopping = e.clone();
        let stop = actix_rt::spawn(async move { stopping.shutdown().await });
        let started = Instant::now();
        let expired = |e: &Engine| {
            e.shard_states()
                .iter()
                .filter(|(_, s)| {
                    s.lead_ids()
                        .filter_map(|l| s.lead(l))
                        .any(|st| st.offers.iter().any(|o| o.status == rota::core::OfferStatus::Expired))
                })
                .count()
        };
        while expired(&e) < ZONES {
            assert!(
                started.elapsed() < DEADLINE,
                "{} of {ZONES} shards ran their due work while the first sync was held",
                expired(&e)
            );
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
        drop(hold);
        stop.await.expect("the stop ran").expect("a clean stop");
    });
}
