//! rota's time never runs backwards across a restart, even when the wall clock does
//! (an NTP step back, a host restored from a snapshot): after recovery the wall
//! clock's floor is the latest time of the recovered state, so a lead accepted after
//! the restart is never timed before one accepted before it (R1: the rotation and
//! every window run on one timeline; `clock` module docs).
//!
//! The first life runs on a manual clock set two hours ahead of the wall clock (what
//! the log of a host whose clock was then stepped back two hours looks like); the
//! second runs on the wall clock, from the log alone or from a snapshot.

mod engine_support;
use engine_support::{in_system, req};
use rota::config::{Config, Sources};
use rota::engine::Engine;
use rota::ids::TenantId;
use rota::protocol::OkResult;
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::sync::Arc;

const AHEAD_MS: i64 = 2 * 3_600_000;

fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn config(manual_start: Option<i64>) -> Config {
    let mut flags = vec!["data_dir=\"/mem\"".to_string(), "wal.fsync=\"always\"".into()];
    if let Some(t) = manual_start {
        flags.push("clock=\"manual\"".into());
        flags.push(format!("manual_clock_start_ms={t}"));
    }
    Config::load(&Sources { flags, ..Default::default() }).expect("the test configuration is valid")
}

async fn ok(e: &Engine, v: Value) -> OkResult {
    let t = TenantId::new("demo");
    e.request(&t, req(v.clone())).await.unwrap_or_else(|err| panic!("{v} answered {err}"))
}

/// Publishes lead `id`; it is offered to `p1` at once.
async fn publish(e: &Engine, id: &str) {
    let lead = json!({"type": "publish_lead", "lead": {
        "id": id, "category": "painting", "zone": "bologna",
        "description": format!("Repaint a two-room flat in Bologna, walls and ceilings ({id})"),
        "client": {"id": format!("client-{id}"), "name": "Anna Rossi", "phone": "+39 333 1234567",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "created_at": wall_ms()
    }});
    match ok(e, lead).await {
        OkResult::Lead(out) => {
            assert!(
                matches!(out.status, rota::core::shard::LeadStatus::Accepted),
                "lead {id} was not accepted: {out:?}"
            );
        }
        other => panic!("publish answered {other:?}"),
    }
}

/// When lead `id` was offered to `p1` (R18 search of the pro's offers).
async fn offered_at(e: &Engine, id: &str) -> i64 {
    match ok(e, json!({"type": "search", "pro": "p1", "query": "bologna"})).await {
        OkResult::Search { offers } => {
            offers
                .iter()
                .find(|o| o.lead.as_str() == id)
                .unwrap_or_else(|| panic!("no offer of {id}: {offers:?}"))
                .offered_at
        }
        other => panic!("search answered {other:?}"),
    }
}

/// One life of the engine on `fs`: on a manual clock at `manual`, or on the wall clock.
fn life(fs: &MemFs, manual: Option<i64>) -> Engine {
    let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
    Engine::start_with_fs(config(manual), handle).expect("the engine starts").0
}

fn run(snapshot_before_restart: bool) {
    let fs = MemFs::new();
    let ahead = wall_ms() + AHEAD_MS;
    in_system(async {
        let e = life(&fs, Some(ahead));
        ok(
            &e,
            json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"],
                   "zones": ["bologna"], "quality": {"reviews": 3}}}),
        )
        .await;
        ok(&e, json!({"type": "grant_credits", "pro": "p1", "op": "pay-1", "credits": 200})).await;
        publish(&e, "before").await;
        if snapshot_before_restart {
            e.snapshot().expect("snapshot");
        }
    });
    let (first, second) = in_system(async {
        let e = life(&fs, None);
        publish(&e, "after").await;
        (offered_at(&e, "before").await, offered_at(&e, "after").await)
    });
    assert!(first >= ahead, "the first life ran on its manual clock");
    assert!(
        second >= first,
        "a lead offered after the restart was offered at {second}, before the one offered before it ({first}): \
         time ran backwards by {} ms",
        first - second
    );
    // Held at the floor, not pushed further: within the test's own duration of it.
    assert!(second - first < AHEAD_MS / 2, "time jumped forward by {} ms", second - first);
}

#[test]
fn r1_time_does_not_run_backwards_across_a_restart_replayed_from_the_log() {
    run(false);
}

#[test]
fn r1_time_does_not_run_backwards_across_a_restart_from_a_snapshot() {
    run(true);
}

/// R26/R27: order facts hold the clock too. A log of order facts alone (no shard, so
/// no shard event records a time) used to leave the clock where the wall clock was,
/// and facts after the restart were dated before those logged (an answer before the
/// request it answers).
#[test]
fn r26_r27_order_facts_alone_hold_the_clock_across_a_restart() {
    let fs = MemFs::new();
    let ahead = wall_ms() + AHEAD_MS;
    in_system(async {
        let e = life(&fs, Some(ahead));
        ok(
            &e,
            json!({"type": "order", "command": {"type": "set_acceptance_mode", "pro": "p1",
            "service": "painting", "mode": {"mode": "auto_accept"}}}),
        )
        .await;
    });
    let now = in_system(async {
        let e = life(&fs, None);
        e.inner.clock.now()
    });
    assert!(now >= ahead, "the clock is {} ms before the logged order fact", ahead - now);
}
