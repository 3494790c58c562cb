//! Changing a pro touches several shards (R1: a pro is in the rotation of every
//! zone x category it covers) and the tenant's pro directory: `upsert_pro` moving a
//! pro to other zones leaves the old shards, joins the new ones and records the new
//! profile; `remove_pro` leaves every shard, then the directory. A change cut off
//! midway (the power goes out between two of its records) must not leave the pro
//! stuck: sending the same request again completes it, and the pro is then in
//! exactly the shards its profile names.
//!
//! Each case sweeps the cut over every disk operation of the change (the first
//! `k` go through, then the power is out), restarts on what the disk kept, sends
//! the request again and checks the rotations with `candidates`.

mod engine_support;
use engine_support::{in_system, req};
use rota::config::{Config, Sources};
use rota::engine::Engine;
use rota::ids::TenantId;
use rota::protocol::{ApiError, OkResult};
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::sync::Arc;

const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn config() -> Config {
    let flags = vec![
        "clock=\"manual\"".to_string(),
        format!("manual_clock_start_ms={T0}"),
        "data_dir=\"/mem\"".into(),
        "wal.fsync=\"always\"".into(),
        "stream_spill_bytes=0".into(),
    ];
    Config::load(&Sources { flags, ..Default::default() }).expect("the test configuration is valid")
}

async fn call(e: &Engine, v: Value) -> Result<OkResult, ApiError> {
    e.request(&TenantId::new("demo"), req(v)).await
}

/// Credits, so that the pro is a candidate wherever it is in the rotation.
fn grant() -> Value {
    json!({"type": "grant_credits", "pro": "p1", "op": "pay-1", "credits": 200})
}

/// Other pros in every zone, with credits, so that each rotation has enough pros to
/// list (R3 lists only pros that can pay).
fn others() -> Vec<Value> {
    (2..5)
        .flat_map(|i| {
            [
                json!({"type": "upsert_pro", "pro": {"id": format!("p{i}"), "categories": ["painting"],
                       "zones": ZONES, "quality": {"reviews": 3}}}),
                json!({"type": "grant_credits", "pro": format!("p{i}"), "op": format!("pay-p{i}"), "credits": 200}),
            ]
        })
        .collect()
}

fn upsert(zones: &[&str]) -> Value {
    json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"], "zones": zones,
           "quality": {"reviews": 3}}})
}

/// The pros in the rotation of `zone` x painting.
async fn rotation(e: &Engine, zone: &str) -> Vec<String> {
    match call(e, json!({"type": "candidates", "zone": zone, "category": "painting"})).await {
        Ok(OkResult::Candidates(c)) => c.pros.into_iter().map(|(p, _)| p.as_str().to_string()).collect(),
        other => panic!("candidates answered {other:?}"),
    }
}

/// Starts on `fs` and runs `f`; the engine is then abandoned (as after a power cut).
fn life<T>(fs: &MemFs, f: impl AsyncFnOnce(&Engine) -> T) -> T {
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(config(), handle).expect("rota starts on what the disk kept");
        f(&e).await
    })
}

/// Sets the scene, then sends `change` with the power cut after `k` disk operations.
/// Returns whether the power went out during the change.
fn cut_during(fs: &MemFs, setup: &[Value], change: &Value, k: u64) -> bool {
    life(fs, async |e| {
        for v in setup {
            call(e, v.clone()).await.unwrap_or_else(|err| panic!("setup {v} answered {err}"));
        }
        fs.cut_power_after(k);
        match call(e, change.clone()).await {
            Ok(_) => {}
            Err(err) => assert_eq!(err.code, "unavailable", "the change answered {err}"),
        }
    });
    fs.power_cuts() > 0
}

const ZONES: [&str; 3] = ["bologna", "milano", "roma"];

#[test]
fn r1_an_upsert_moving_a_pro_cut_off_midway_completes_when_sent_again() {
    for k in 1.. {
        let fs = MemFs::new();
        let setup = [others(), vec![upsert(&["bologna", "milano"]), grant()]].concat();
        let change = upsert(&["milano", "roma"]);
        if !cut_during(&fs, &setup, &change, k) {
            // Every earlier `k` cut it.
            assert!(k > 3, "the sweep cut the change at {} points only", k - 1);
            break;
        }
        life(&fs, async |e| {
            call(e, change.clone()).await.unwrap_or_else(|err| {
                panic!("cut after {k} disk operations: the upsert sent again answered {err}")
            });
            for zone in ZONES {
                let expected = zone != "bologna";
                assert_eq!(
                    rotation(e, zone).await.contains(&"p1".to_string()),
                    expected,
                    "cut after {k} disk operations: p1 in the rotation of {zone}"
                );
            }
        });
    }
}

#[test]
fn r1_a_removal_cut_off_midway_completes_when_sent_again() {
    for k in 1.. {
        let fs = MemFs::new();
        let setup = [others(), vec![upsert(&ZONES), grant()]].concat();
        let change = json!({"type": "remove_pro", "pro": "p1"});
        if !cut_during(&fs, &setup, &change, k) {
            // Every earlier `k` cut it.
            assert!(k > 3, "the sweep cut the change at {} points only", k - 1);
            break;
        }
        life(&fs, async |e| {
            match call(e, change.clone()).await {
                Ok(_) => {}
                // The directory record made it: the removal was complete.
                Err(err) if err.code == "unknown_pro" => {}
                Err(err) => panic!("cut after {k} disk operations: the removal sent again answered {err}"),
            }
            for zone in ZONES {
                assert!(
                    !rotation(e, zone).await.contains(&"p1".to_string()),
                    "cut after {k} disk operations: p1 still in the rotation of {zone}"
                );
            }
            // And the pro can come back.
            call(e, upsert(&["roma"])).await.expect("p1 joins again");
            assert!(rotation(e, "roma").await.contains(&"p1".to_string()));
        });
    }
}

#[test]
fn r1_an_upsert_whose_client_goes_away_midway_still_completes() {
    let fs = MemFs::new();
    life(&fs, async |e| {
        for v in [others(), vec![upsert(&["bologna", "milano"]), grant()]].concat() {
            call(e, v.clone()).await.unwrap_or_else(|err| panic!("setup {v} answered {err}"));
        }
        // The client's connection closes while the change waits for its first step to
        // be durable: the request's future is dropped.
        let tenant = TenantId::new("demo");
        let change = e.request(&tenant, req(upsert(&["milano", "roma"])));
        assert!(futures_util::FutureExt::now_or_never(change).is_none(), "the change waits for the log");
        // A later change of the same pro runs after it, to its end.
        call(e, json!({"type": "set_availability", "pro": "p1", "availability": {}}))
            .await
            .expect("availability set");
        for zone in ZONES {
            assert_eq!(
                rotation(e, zone).await.contains(&"p1".to_string()),
                zone != "bologna",
                "p1 in the rotation of {zone}"
            );
        }
    });
}

/// A painting lead in `zone` (a verified phone, enough details for the quality gate).
fn publish(id: &str, zone: &str) -> Value {
    json!({"type": "publish_lead", "lead": {
        "id": id, "category": "painting", "zone": zone,
        "description": "Repaint a two-room flat, walls and ceilings, next week",
        "details": {"rooms": "2"},
        "client": {"id": format!("client-{id}"), "name": "Ana Garcia", "phone": "+39 333 000 0000",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "created_at": T0
    }})
}

/// Whether the shard of `zone` x painting keeps a history of p1 from before it left.
fn history_in(e: &Engine, zone: &str) -> bool {
    e.shard_states()
        .iter()
        .any(|(k, s)| k.zone.as_str() == zone && s.has_departed(&rota::ids::ProId::new("p1")))
}

/// p1, offered L1 in bologna, moves to milano.
async fn p1_moves_away_from_l1(e: &Engine) {
    for v in others().into_iter().chain([grant(), upsert(&["bologna"]), publish("L1", "bologna")]) {
        call(e, v.clone()).await.unwrap_or_else(|err| panic!("{v} answered {err}"));
    }
    call(e, upsert(&["milano"])).await.unwrap();
}

/// `search` finds p1's offer of L1 (in bologna, which it left).
async fn search_finds_l1(e: &Engine) {
    match call(e, json!({"type": "search", "pro": "p1", "query": ""})).await {
        Ok(OkResult::Search { offers }) => {
            assert_eq!(offers.iter().map(|o| o.lead.as_str()).collect::<Vec<_>>(), ["L1"])
        }
        other => panic!("search answered {other:?}"),
    }
}

/// R14/R15/R18: a pro that moved keeps its history where it was (its stats for a
/// return, and its offers there, which `search` still finds); removed from the tenant,
/// that history goes too, so a pro added again later starts afresh everywhere.
#[test]
fn r14_r18_a_removed_pro_leaves_no_history_where_it_moved_away_from() {
    let fs = MemFs::new();
    life(&fs, async |e| {
        p1_moves_away_from_l1(e).await;
        assert!(history_in(e, "bologna"), "moved away: its bologna history is kept");
        search_finds_l1(e).await;
        call(e, json!({"type": "remove_pro", "pro": "p1"})).await.unwrap();
        assert!(!history_in(e, "bologna"), "removed for good: no history left behind");
        let again = call(e, json!({"type": "remove_pro", "pro": "p1"})).await.unwrap_err();
        assert_eq!(again.code, "unknown_pro", "nothing of p1 is left to remove");
    });
    // Replay rebuilds the same.
    life(&fs, async |e| assert!(!history_in(e, "bologna")));
}

/// R14/R18: where a pro left its history is known again after a restart (the shards
/// are the record: rebuilt from them), so `search` still finds the offers it had there
/// and a removal still clears that history.
#[test]
fn r14_r18_where_a_pro_left_its_history_is_known_after_a_restart() {
    let fs = MemFs::new();
    life(&fs, async |e| p1_moves_away_from_l1(e).await);
    life(&fs, async |e| {
        search_finds_l1(e).await;
        call(e, json!({"type": "remove_pro", "pro": "p1"})).await.unwrap();
        assert!(!history_in(e, "bologna"), "removed for good: no history left behind");
    });
}
