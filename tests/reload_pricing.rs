//! R11 across policy changes: only proposals per lead are learned from closed leads;
//! the category's job value and conversion rate are always those of the policy in
//! force, so a reload that changes them changes the next prices, in the core and
//! through the whole engine.

mod common;
mod engine_support;

use engine_support::{acme_config, in_system, ok, T0};
use rota::config::Config;
use rota::core::shard::{Command, Event, Shard};
use rota::core::{Lead, Policy};
use rota::engine::Engine;
use rota::ids::{CategoryId, TenantId};
use rota::protocol::OkResult;
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::sync::Arc;

const DAY: i64 = 24 * 3_600_000;

// ---------------------------------------------------------------------------------
// The core: a shard and its policy changes
// ---------------------------------------------------------------------------------

/// R11 prices in a shared-mode shard (`common::R11_POLICY`): a painting lead is worth
/// 1200.00 x 25 % / 5 proposals = 60 credits; proposals are learned at a rate of 0.5;
/// here with the painting job value and the learning rate given, and room for prices
/// above 100.
fn policy(job_value_cents: u64, ema_permille: u32) -> Arc<Policy> {
    let text = common::R11_POLICY
        .replace("avg_job_value_cents = 120000", &format!("avg_job_value_cents = {job_value_cents}"))
        .replace("proposals_ema_permille = 500", &format!("proposals_ema_permille = {ema_permille}"))
        .replace("max_price_credits = 100", "max_price_credits = 1000");
    common::policy(&text)
}

/// A lead of the test shard with a form answer (no thin-details discount).
fn lead(id: &str, at: i64) -> Lead {
    Lead { details: [("rooms".to_string(), "3".to_string())].into_iter().collect(), ..common::lead(id, at) }
}

/// Decides and applies `cmd`, logging its events.
fn run(s: &mut Shard, log: &mut Vec<Event>, now: i64, cmd: Command) -> rota::core::Reply {
    let d = s.decide(now, &cmd, &rota::core::Unlimited).expect("command accepted");
    for e in &d.events {
        s.apply(e);
    }
    s.check_invariants().unwrap();
    log.extend(d.events);
    d.reply
}

fn price_of(s: &mut Shard, log: &mut Vec<Event>, id: &str, at: i64) -> u64 {
    match run(s, log, at, Command::PublishLead { lead: lead(id, at).into() }) {
        rota::core::Reply::Lead(o) => o.price,
        other => panic!("{other:?}"),
    }
}

/// R11: after a lead closed (proposals learned), a policy change that doubles the
/// category's job value doubles the next price, with the learned proposals kept; a
/// policy that stops learning prices from its configured proposals again. Replaying the
/// log under the same policy changes rebuilds the same shard.
#[test]
fn r11_after_a_close_a_policy_change_of_the_job_value_changes_the_price_and_keeps_the_learned_proposals() {
    let mut s = Shard::new(common::key(), policy(120_000, 500));
    let mut log = Vec::new();
    run(&mut s, &mut log, T0, Command::UpsertPro { pro: common::pro("p1") });
    assert_eq!(price_of(&mut s, &mut log, "a", T0), 60);
    // Nobody responds; the lead closes after 48 h: 0 proposals observed, the moving
    // average (rate 0.5) halves to 2.5 proposals.
    run(&mut s, &mut log, T0 + 3 * DAY, Command::Tick);
    assert_eq!(price_of(&mut s, &mut log, "b", T0 + 3 * DAY), 120, "1200.00 x 25 % / 2.5");
    let mut changes = Vec::new();
    s.set_policy(policy(240_000, 500));
    changes.push((log.len(), policy(240_000, 500)));
    assert_eq!(price_of(&mut s, &mut log, "c", T0 + 3 * DAY), 240, "2400.00 x 25 % / 2.5 learned");
    s.set_policy(policy(240_000, 0));
    changes.push((log.len(), policy(240_000, 0)));
    assert_eq!(price_of(&mut s, &mut log, "d", T0 + 3 * DAY), 120, "not learning: 5 proposals as configured");

    let mut replayed = Shard::new(common::key(), policy(120_000, 500));
    let mut changes = changes.into_iter().peekable();
    for (i, ev) in log.iter().enumerate() {
        if let Some((_, p)) = changes.next_if(|(at, _)| *at == i) {
            replayed.set_policy(p);
        }
        replayed.apply(ev);
    }
    assert!(replayed == s, "replay rebuilds the shard");
}

// ---------------------------------------------------------------------------------
// The engine: a reload
// ---------------------------------------------------------------------------------

/// The example zaask policy for tenant `acme`, with `changes`.
fn config(dir: &std::path::Path, changes: &[(&str, &str)]) -> Config {
    acme_config(dir, "zaask.toml", "zaask", changes)
}

fn zaask_lead(id: &str, at: i64) -> Value {
    json!({"type": "publish_lead", "lead": {
        "id": id, "category": "painting", "zone": "lisboa",
        "description": format!("Repaint a two-room flat in Lisbon, walls and ceilings ({id})"),
        "details": {"rooms": "2"},
        "client": {"id": format!("client-{id}"), "name": "Ana Garcia", "phone": "+351 910 000 000",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "created_at": at
    }})
}

async fn price_of_new_lead(e: &Engine, id: &str, at: i64) -> u64 {
    match ok(e, zaask_lead(id, at)).await {
        OkResult::Lead(o) => o.price,
        other => panic!("{other:?}"),
    }
}

/// R11 + reload docs ("Decisions from then on follow it"): once a lead of the shard has
/// closed (proposals per lead learned), a reload that doubles the category's average
/// job value about doubles the price of the next lead.
#[test]
fn r11_a_reload_that_doubles_the_job_value_after_a_close_doubles_later_prices() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let base = [("max_price_credits", "1000")];
        let (e, _) = Engine::start_with_fs(config(dir.path(), &base), handle).expect("starts");
        ok(
            &e,
            json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"], "zones": ["lisboa"]}}),
        )
        .await;
        let first = price_of_new_lead(&e, "A1", T0).await;
        // The lead closes (R11 learning of proposals per lead).
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 3 * DAY})).await;
        let before = price_of_new_lead(&e, "A2", T0 + 3 * DAY).await;
        let doubled =
            [("max_price_credits", "1000"), ("avg_job_value_cents = 120000", "avg_job_value_cents = 240000")];
        e.reload(&config(dir.path(), &doubled)).expect("reloaded");
        let policy = e.tenant(&TenantId::new("acme")).unwrap().cfg().policy.clone();
        let stats = policy.pricing.as_ref().unwrap().stats(&CategoryId::new("painting"));
        assert_eq!(stats.avg_job_value_cents, 240000, "the reload applied the new figure");
        let after = price_of_new_lead(&e, "A3", T0 + 3 * DAY + 1).await;
        assert!(
            after as f64 > 1.8 * before as f64,
            "doubling the job value should about double the price: first {first}, before {before}, after {after}"
        );
    });
}
