//! Order requests (R25-R27) over time in the whole engine: the tick keeps up with the
//! chains a tenant ends.

mod engine_support;

use engine_support::{acme_config, in_system, ok, send, T0};
use rota::engine::Engine;
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::sync::Arc;

const DAY: i64 = 24 * 3_600_000;

fn order(command: Value) -> Value {
    json!({"type": "order", "command": command})
}

fn place(id: &str) -> Value {
    order(json!({"type": "place_order", "order": id,
        "placement": {"pro": "s1", "client": format!("k-{id}"), "service": "logo", "package": "basic"}}))
}

/// R25-R27 retention: a tenant that ends more chains than one tick forgets (1,024) has
/// them all forgotten by the round of housekeeping after the retention; one bounded
/// tick a round fell behind for ever.
#[test]
fn r25_r27_the_order_tick_keeps_up_with_more_ended_chains_than_one_tick_forgets() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let cfg = acme_config(dir.path(), "prontopro.toml", "prontopro", &[]);
        let (e, _) = Engine::start_with_fs(cfg, handle).expect("starts");
        ok(
            &e,
            order(json!({"type": "set_acceptance_mode", "pro": "s1", "service": "logo",
            "mode": {"mode": "auto_accept"}})),
        )
        .await;
        let n = rota::core::orders::MAX_FORGOTTEN_PER_TICK + 100;
        // Many at once: they share the log's syncs.
        let ids: Vec<String> = (0..n).map(|i| format!("o{i}")).collect();
        futures_util::future::join_all(ids.iter().map(|id| ok(&e, place(id)))).await;
        let cancel = |id: &String| order(json!({"type": "cancel_order", "order": id}));
        futures_util::future::join_all(ids.iter().map(|id| ok(&e, cancel(id)))).await;
        // A retried cancel is answered while the chain is remembered...
        ok(&e, cancel(&ids[0])).await;
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 30 * DAY})).await;
        // ...and every chain is forgotten once the retention is over.
        let answers = futures_util::future::join_all(ids.iter().map(|id| send(&e, cancel(id)))).await;
        let remembered =
            answers.iter().filter(|a| !matches!(a, Err(err) if err.code == "unknown_order")).count();
        assert_eq!(remembered, 0, "{remembered} of {n} chains still remembered");
    });
}
