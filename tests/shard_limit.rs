//! `max_shards_per_tenant`: a lead or a pro naming a new zone x category pair past the
//! bound is refused `shard_limit` and changes nothing (each shard is state, a timer and
//! a snapshot entry: a client must not be able to create them without bound).

mod engine_support;

use engine_support::{acme_config, in_system, ok, send, T0};
use rota::config::{Config, Sources};
use rota::engine::Engine;
use rota::ids::ProId;
use serde_json::{json, Value};
use std::sync::Arc;

/// zaask, at most two shards for the tenant.
fn config(dir: &std::path::Path) -> Config {
    acme_config(dir, "zaask.toml", "zaask", &[]);
    let path = dir.join("rota.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("max_shards_per_tenant = 2\n{text}")).unwrap();
    Config::load(&Sources { file: Some(path), ..Default::default() }).unwrap()
}

fn lead(id: &str, zone: &str) -> Value {
    json!({"type": "publish_lead", "lead": {
        "id": id, "category": "painting", "zone": zone,
        "description": "Repaint a two-room flat, walls and ceilings, next week",
        "details": {"rooms": "2"},
        "client": {"id": "c1", "name": "Ana Garcia", "phone": "+351 910 000 000",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "created_at": T0}})
}

fn pro(id: &str, zones: &[&str]) -> Value {
    json!({"type": "upsert_pro", "pro": {"id": id, "categories": ["painting"], "zones": zones}})
}

#[test]
fn a_new_shard_past_the_tenants_bound_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    in_system(async {
        let fs: Arc<dyn rota::wal::Fs> = Arc::new(rota::wal::MemFs::new().process_handle());
        let (e, _) = Engine::start_with_fs(config(dir.path()), fs).expect("starts");
        ok(&e, pro("p1", &["lisboa"])).await;
        ok(&e, lead("L1", "porto")).await;
        let shards = e.shard_states().len();
        assert_eq!(shards, 2);
        // A lead in a third zone.
        let err = send(&e, lead("L2", "faro")).await.unwrap_err();
        assert_eq!(err.code, "shard_limit", "{err:?}");
        assert!(err.message.contains("max_shards_per_tenant"), "{err:?}");
        let gone = send(&e, json!({"type": "explain", "lead": "L2"})).await.unwrap_err();
        assert_eq!(gone.code, "unknown_lead");
        // A pro covering two new zones: refused before any step (no shard joined, no
        // profile in the directory).
        let err = send(&e, pro("p2", &["lisboa", "faro", "braga"])).await.unwrap_err();
        assert_eq!(err.code, "shard_limit", "{err:?}");
        assert_eq!(e.shard_states().len(), shards);
        let states = e.shard_states();
        assert!(
            states.iter().all(|(_, s)| !s.pro_ids().any(|p| p == &ProId::new("p2"))),
            "p2 joined nothing"
        );
        let unknown = send(&e, json!({"type": "search", "pro": "p2", "query": ""})).await.unwrap_err();
        assert_eq!(unknown.code, "unknown_pro");
        // Existing shards keep working: a lead and a pro there.
        ok(&e, lead("L3", "lisboa")).await;
        ok(&e, pro("p3", &["porto", "lisboa"])).await;
    });
}

/// R1, R7: a publish refused whatever a shard would hold (its lifetime already over, a
/// creation time far ahead of the clock) creates no shard: it would count against the
/// bound for good and exist in memory only (the log has no record of it), so refused
/// publishes into new zones would lock the tenant out of new zones.
#[test]
fn r1_r7_a_refused_publish_into_a_new_zone_creates_no_shard() {
    let dir = tempfile::tempdir().unwrap();
    in_system(async {
        let fs: Arc<dyn rota::wal::Fs> = Arc::new(rota::wal::MemFs::new().process_handle());
        let (e, _) = Engine::start_with_fs(config(dir.path()), fs).expect("starts");
        ok(&e, pro("p1", &["lisboa"])).await;
        let mut expired = lead("E1", "faro");
        expired["lead"]["created_at"] = json!(T0 - 30 * 24 * 3_600_000);
        assert_eq!(send(&e, expired).await.unwrap_err().code, "lead_expired");
        let mut ahead = lead("F1", "braga");
        ahead["lead"]["created_at"] = json!(T0 + 3_600_000);
        let err = send(&e, ahead).await.unwrap_err();
        assert_eq!((err.code.as_str(), err.field.as_deref()), ("invalid_field", Some("lead.created_at")));
        assert_eq!(e.shard_states().len(), 1, "only lisboa's");
        // Room is left for the next new zone.
        ok(&e, lead("L1", "porto")).await;
        assert_eq!(e.shard_states().len(), 2);
    });
}
