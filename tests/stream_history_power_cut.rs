//! The stream history on disk across a power cut of the whole engine (in-process, on
//! the in-memory filesystem): what each snapshot made durable joins the stream that
//! recovery rebuilds, so a subscriber away for longer than the in-memory buffer still
//! resumes from where it was, without a gap.

mod engine_support;

use engine_support::{in_system, req, stream_from_start};
use rota::config::{Config, Sources};
use rota::engine::Engine;
use rota::ids::TenantId;
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::sync::Arc;

fn config() -> Config {
    let flags = [
        "data_dir=\"/mem\"",
        "wal.fsync=\"always\"",
        "clock=\"manual\"",
        "manual_clock_start_ms=1764000000000",
        // 20 events in memory: every resume below is served from disk.
        "stream_retention_events=20",
        "stream_spill_bytes=65536",
    ];
    Config::load(&Sources { flags: flags.iter().map(|f| f.to_string()).collect(), ..Default::default() })
        .expect("the test configuration is valid")
}

async fn ok(e: &Engine, v: Value) {
    e.request(&TenantId::new("demo"), req(v.clone()))
        .await
        .unwrap_or_else(|err| panic!("{v} answered {err}"));
}

/// Publishes leads `{prefix}0` to `{prefix}{n-1}`.
async fn publish(e: &Engine, prefix: &str, n: u32) {
    for i in 0..n {
        let id = format!("{prefix}{i}");
        let lead = json!({"type": "publish_lead", "lead": {
            "id": id, "category": "painting", "zone": "bologna",
            "description": format!("Repaint a two-room flat in Bologna, walls and ceilings ({id})"),
            "client": {"id": format!("client-{id}"), "name": "Anna Rossi", "phone": "+39 333 1234567",
                       "phone_verified": true, "contact": {"call": true, "chat": true}},
            "created_at": 1764000000000i64
        }});
        ok(e, lead).await;
    }
}

#[test]
fn a_resume_older_than_the_buffer_is_served_without_a_gap_after_a_power_cut() {
    let fs = MemFs::new();
    let before = in_system(async {
        let fs: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(config(), fs).expect("first life starts");
        ok(&e, json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"], "zones": ["bologna"]}}))
            .await;
        ok(&e, json!({"type": "grant_credits", "pro": "p1", "op": "pay-1", "credits": 100000})).await;
        publish(&e, "A", 40).await;
        e.drain_spills();
        e.snapshot().expect("snapshot");
        // After the snapshot: in the log (durable) and in the history (not synced).
        publish(&e, "B", 40).await;
        e.drain_spills();
        stream_from_start(&e.hub(&TenantId::new("demo")).unwrap()).unwrap()
    });
    assert!(before.len() > 150, "{} events", before.len());
    fs.power_cut();
    let after = in_system(async {
        let fs: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(config(), fs).expect("second life recovers");
        let hub = e.hub(&TenantId::new("demo")).unwrap();
        assert_eq!(hub.spill().unwrap().stats.restarts.load(std::sync::atomic::Ordering::Relaxed), 0);
        stream_from_start(&hub).unwrap()
    });
    assert_eq!(after.first().map(|e| e.0), Some(1));
    assert_eq!(after, before, "the same events, in order, from the first");
}
