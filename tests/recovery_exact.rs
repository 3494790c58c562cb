//! Recovery rebuilds exactly the state that ran: every shard (rotation ring, leads,
//! offers, deadlines, learned prices) and every account equal to what they were,
//! across policy changes made by reloads in the middle of the traffic (each decision
//! replayed under the policy it was made with), from the log alone or from a snapshot
//! taken between two of them.

mod engine_support;

use engine_support::{acme_config, in_system, req, T0};
use rota::config::Config;
use rota::engine::Engine;
use rota::ids::TenantId;
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::sync::Arc;

const DAY: i64 = 24 * 3_600_000;

/// The example zaask policy for tenant `acme`, with `changes`.
fn config(dir: &std::path::Path, changes: &[(&str, &str)]) -> Config {
    acme_config(dir, "zaask.toml", "zaask", changes)
}

/// Sends `v`; an error answer is fine (an offer action on a lead not offered to the
/// pro, a response past a cap): the state must match either way.
async fn send(e: &Engine, v: Value) {
    let _ = e.request(&TenantId::new("acme"), req(v)).await;
}

async fn leads(e: &Engine, prefix: &str, n: u32, at: i64) {
    for i in 0..n {
        let id = format!("{prefix}{i}");
        send(e, json!({"type": "publish_lead", "lead": {
            "id": id, "category": "painting", "zone": "lisboa",
            "description": format!("Repaint a two-room flat in Lisbon, walls and ceilings ({id})"),
            "details": {"rooms": "2"},
            "client": {"id": format!("client-{id}"), "name": "Ana Garcia", "phone": format!("+351 910 000 {i:03}"),
                       "phone_verified": true, "contact": {"call": i % 2 == 0, "chat": true}},
            "created_at": at
        }}))
        .await;
    }
}

/// Pros `p{i}` act on lead `lead` (`decline` by the pro).
async fn act(e: &Engine, lead: &str, pros: &[u32], action: &str) {
    for p in pros {
        let mut v = json!({"type": "offer", "lead": lead, "pro": format!("p{p}"), "action": action});
        if action == "decline" {
            v["by"] = json!("pro");
        }
        send(e, v).await;
    }
}

type State = (Vec<(rota::ids::ShardKey, Arc<rota::core::shard::Shard>)>, rota::ledger::LedgerSnapshot);

fn state(e: &Engine) -> State {
    (e.shard_states(), e.inner.ledger.snapshot())
}

fn run(snapshot_between: bool) {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    let ran = in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(config(dir.path(), &[]), handle).expect("first life starts");
        for p in 1..=6 {
            send(&e, json!({"type": "upsert_pro", "pro": {"id": format!("p{p}"), "categories": ["painting"],
                            "zones": ["lisboa"], "quality": {"reviews": p * 3, "rating_centi": 400 + p * 10}}}))
            .await;
            send(&e, json!({"type": "grant_credits", "pro": format!("p{p}"), "op": format!("g{p}"), "credits": 1000}))
                .await;
        }
        // Under the file's policy: offered to all, 5 responders, 7-day guarantee.
        leads(&e, "A", 4, T0).await;
        act(&e, "A0", &[1, 2], "respond").await;
        act(&e, "A1", &[3], "decline").await;
        act(&e, "A1", &[4], "respond").await;
        // Narrower releases, three responders, a 1-day guarantee, harsher declines.
        let p2 = [
            ("offer_fanout", "2"),
            ("max_responders", "3"),
            ("guarantee_window_s", "86400"),
            ("decline_penalty_permille", "200"),
        ];
        e.reload(&config(dir.path(), &p2)).expect("reloaded");
        leads(&e, "B", 4, T0 + 60_000).await;
        for b in ["B0", "B1", "B2"] {
            act(&e, b, &[1, 2, 3, 4, 5, 6], "respond").await;
        }
        act(&e, "B3", &[1, 2, 3, 4, 5, 6], "decline").await;
        act(&e, "A2", &[5, 6, 1, 2], "respond").await;
        if snapshot_between {
            e.snapshot().expect("snapshot");
        }
        send(&e, json!({"type": "advance_clock", "to_ms": T0 + DAY + DAY / 2})).await;
        // A 3-day guarantee and heavier base weights.
        let p3 = [("guarantee_window_s", "259200"), ("base_weight", "150"), ("max_responders", "4")];
        e.reload(&config(dir.path(), &p3)).expect("reloaded");
        leads(&e, "C", 3, T0 + DAY + DAY / 2).await;
        act(&e, "C0", &[6, 5, 4, 3, 2], "respond").await;
        act(&e, "A3", &[3, 4], "respond").await;
        send(&e, json!({"type": "advance_clock", "to_ms": T0 + 3 * DAY})).await;
        // The traffic did what the check needs: responses charged, some refunded by a
        // guarantee, under each policy.
        let (mut captured, mut refunded) = (0, 0);
        for p in 1..=6 {
            let b = e
                .request(&TenantId::new("acme"), req(json!({"type": "balance", "pro": format!("p{p}")})))
                .await;
            let b = serde_json::to_value(b.expect("a balance")).unwrap();
            captured += b["captured"].as_u64().expect("captured");
            refunded += b["refunded"].as_u64().expect("refunded");
        }
        assert!(captured > 0 && refunded > 0, "captured {captured}, refunded {refunded}");
        state(&e)
    });
    // Abandoned without a stop (every request above was answered, so durable).
    let recovered = in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let p3 = [("guarantee_window_s", "259200"), ("base_weight", "150"), ("max_responders", "4")];
        let (e, _) = Engine::start_with_fs(config(dir.path(), &p3), handle).expect("second life recovers");
        state(&e)
    });
    assert!(ran.0.iter().any(|(_, s)| s.open_leads() > 0), "leads were decided");
    assert_eq!(ran.1, recovered.1, "accounts");
    assert_eq!(ran.0.len(), recovered.0.len(), "shards");
    for ((k, a), (_, b)) in ran.0.iter().zip(&recovered.0) {
        assert!(a == b, "shard {k:?} differs after recovery (snapshot between: {snapshot_between})");
    }
}

#[test]
fn r6_r12_r28_recovery_from_the_log_rebuilds_the_state_that_ran_across_policy_changes() {
    run(false);
}

#[test]
fn r6_r12_r28_recovery_from_a_snapshot_rebuilds_the_state_that_ran_across_policy_changes() {
    run(true);
}
