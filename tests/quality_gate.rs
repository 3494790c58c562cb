//! R2's competitor check through the whole engine (in-process, manual clock, in-memory
//! filesystem): the tenant's pro directory decides, not only the lead's own zone.

mod engine_support;

use engine_support::{acme_config, in_system, ok, T0};
use rota::engine::Engine;
use rota::protocol::OkResult;
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::sync::Arc;

fn lead(id: &str, client_pro: &str) -> Value {
    json!({"type": "publish_lead", "lead": {
        "id": id, "category": "painting", "zone": "bologna",
        "description": format!("Repaint a two-room flat, walls and ceilings ({id})"),
        "details": {"rooms": "2", "surface_m2": "60"},
        "client": {"id": format!("client-{id}"), "name": "Anna Rossi", "phone": "+39 333 1234567",
                   "phone_verified": true, "contact": {"call": true, "chat": true}, "pro_id": client_pro},
        "created_at": T0
    }})
}

/// R2 ("`competitor`: the client is a pro who offers this same category"): a painter
/// who works only in Milan asking for a painter in Bologna is a competitor; a plumber
/// asking for the same is a client.
#[test]
fn r2_a_pro_offering_the_category_in_another_zone_is_a_competitor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = acme_config(dir.path(), "prontopro.toml", "prontopro", &[]);
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(cfg, handle).expect("engine starts");
        for (id, category, zone) in
            [("b1", "painting", "bologna"), ("m1", "painting", "milano"), ("w1", "plumbing", "bologna")]
        {
            ok(
                &e,
                json!({"type": "upsert_pro", "pro": {"id": id, "categories": [category], "zones": [zone]}}),
            )
            .await;
        }
        let status =
            |r: &OkResult| serde_json::to_value(r).unwrap()["status"].as_str().unwrap_or("").to_string();
        let outcome = ok(&e, lead("L1", "m1")).await;
        assert_eq!(status(&outcome), "rejected", "{outcome:?}");
        assert_eq!(serde_json::to_value(&outcome).unwrap()["reason"], "competitor", "{outcome:?}");
        let outcome = ok(&e, lead("L2", "w1")).await;
        assert_eq!(status(&outcome), "accepted", "a plumber is a client for painting: {outcome:?}");
    });
}
