//! Money at its edges, through the whole engine (in-process, on the in-memory
//! filesystem, on the manual clock, under the example tenant policies): ids of the
//! longest valid length, top-up rules and resumes close together, auto-buy spends the
//! ledger refuses, and lead ids published again once forgotten.

mod engine_support;

use engine_support::{acme, acme_config, in_system, ok, send, T0};
use rota::config::Config;
use rota::engine::Engine;
use rota::ids::{LeadId, ProId};
use rota::ledger::{BudgetName, OpId, RefundReason, TopupRule};
use rota::protocol::OkResult;
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::sync::Arc;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;

/// The example policy `file` (tenant `name`) for tenant `acme`.
fn config(dir: &std::path::Path, file: &str, name: &str) -> Config {
    acme_config(dir, file, name, &[])
}

/// A painting lead; `call: false` makes it chat-only (R9: held, not charged).
fn lead(id: &str, zone: &str, call: bool, at: i64) -> Value {
    json!({
        "id": id, "category": "painting", "zone": zone,
        "description": "Repaint a two-room flat, walls and ceilings, next week",
        "details": {"rooms": "2"},
        "client": {"id": format!("client-{}", at), "name": "Ana Garcia", "phone": "+351 910 000 000",
                   "phone_verified": true, "contact": {"call": call, "chat": true}},
        "created_at": at
    })
}

fn publish(id: &str, zone: &str, call: bool, at: i64) -> Value {
    json!({"type": "publish_lead", "lead": lead(id, zone, call, at)})
}

fn offer(lead: &str, pro: &str, action: &str) -> Value {
    json!({"type": "offer", "lead": lead, "pro": pro, "action": action})
}

/// Runs `f` on a fresh engine for tenant `acme` on `file`'s policy.
fn with_engine<F, Fut>(file: &str, name: &str, f: F)
where
    F: FnOnce(Engine) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    with_engine_changed(file, name, &[], f)
}

/// [`with_engine`] with `changes` to the policy (`acme_config`'s).
fn with_engine_changed<F, Fut>(file: &str, name: &str, changes: &[(&str, &str)], f: F)
where
    F: FnOnce(Engine) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let cfg = acme_config(dir.path(), file, name, changes);
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(cfg, handle).expect("engine starts");
        f(e.clone()).await;
        e.inner.ledger.check_invariants().expect("ledger invariants");
    });
}

fn balance(e: &Engine, pro: &str) -> rota::ledger::Balance {
    e.inner.ledger.balance(&acme(), &ProId::new(pro))
}

/// Pro `pro` in Lisbon painting (zaask) with 100 credits.
async fn zaask_pro(e: &Engine, pro: &str) {
    ok(e, json!({"type": "upsert_pro", "pro": {"id": pro, "categories": ["painting"], "zones": ["lisboa"]}}))
        .await;
    ok(e, json!({"type": "grant_credits", "pro": pro, "op": "pay-1", "credits": 100})).await;
}

/// Auto-buyer `pro` in Madrid painting (habitissimo), config `main` of 24 credits a
/// week (two leads at 12).
fn buyer(pro: &str, paused_until: Option<i64>) -> Value {
    json!({"type": "upsert_pro", "pro": {"id": pro, "categories": ["painting"], "zones": ["madrid"],
        "autobuy": [{"name": "main", "zones": ["madrid"], "categories": ["painting"],
                     "weekly_budget_credits": 24, "paused_until": paused_until}]}})
}

fn budget(e: &Engine, pro: &str) -> rota::ledger::BudgetBalance {
    e.inner.ledger.budget(&acme(), &ProId::new(pro), &BudgetName::new("main")).expect("budget set")
}

/// Valid ids (at most 128 bytes each) whose `hold:<lead>:<pro>` is 126 bytes and whose
/// `release:`/`capture:` ids are 129: over a bound of one wire id, a hold was taken
/// and could never be settled.
fn long_ids() -> (String, String) {
    (format!("L{}", "x".repeat(59)), format!("p{}", "y".repeat(59)))
}

/// Ids of the longest valid length.
fn longest_ids() -> (String, String) {
    (format!("L{}", "x".repeat(127)), format!("p{}", "y".repeat(127)))
}

// ---------------------------------------------------------------------------------
// Ids of any valid length (op ids derived from them fit the ledger's bound)
// ---------------------------------------------------------------------------------

/// R9: a chat-only hold is released when the lead closes without a reply.
#[test]
fn r9_a_hold_on_long_ids_is_released_when_the_lead_closes() {
    with_engine("zaask.toml", "zaask", |e| async move {
        let (l, p) = long_ids();
        zaask_pro(&e, &p).await;
        ok(&e, publish(&l, "lisboa", false, T0)).await;
        ok(&e, offer(&l, &p, "respond")).await;
        let b = balance(&e, &p);
        assert!(b.held > 0, "the response holds the price: {b:?}");
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 3 * DAY})).await;
        let b = balance(&e, &p);
        assert_eq!((b.held, b.available), (0, 100), "the lead closed without a reply: hold released");
    });
}

/// R9: a chat-only hold is captured when the client replies.
#[test]
fn r9_a_hold_on_long_ids_is_captured_when_the_client_replies() {
    with_engine("zaask.toml", "zaask", |e| async move {
        let (l, p) = long_ids();
        zaask_pro(&e, &p).await;
        ok(&e, publish(&l, "lisboa", false, T0)).await;
        ok(&e, offer(&l, &p, "respond")).await;
        let price = balance(&e, &p).held;
        ok(&e, offer(&l, &p, "client_replied")).await;
        let b = balance(&e, &p);
        assert_eq!((b.held, b.captured), (0, price), "the client replied: hold captured");
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 3 * DAY})).await;
        assert_eq!(balance(&e, &p).held, 0, "no credits left held after the lead closed");
    });
}

/// R9: a response on ids of 128 bytes is charged (the ledger once refused its
/// `charge:<lead>:<pro>` as `invalid_field` naming `credits`).
#[test]
fn r9_a_response_on_128_byte_ids_is_charged() {
    with_engine("zaask.toml", "zaask", |e| async move {
        let (l, p) = longest_ids();
        zaask_pro(&e, &p).await;
        ok(&e, publish(&l, "lisboa", true, T0)).await;
        ok(&e, offer(&l, &p, "respond")).await;
        let b = balance(&e, &p);
        assert!(b.captured > 0 && b.available + b.captured == 100, "charged the price: {b:?}");
    });
}

/// R10: a payment id of 128 bytes (a valid `op`) is posted, not `ledger_refused`.
#[test]
fn r10_a_grant_with_a_128_byte_payment_id_is_posted() {
    with_engine("zaask.toml", "zaask", |e| async move {
        let op = "g".repeat(128);
        ok(&e, json!({"type": "grant_credits", "pro": "p1", "op": op, "credits": 10})).await;
        ok(&e, json!({"type": "grant_credits", "pro": "p1", "op": op, "credits": 10})).await;
        assert_eq!(balance(&e, "p1").granted, 10, "the same payment posted once");
    });
}

/// R19/R21: an auto-buyer with a 128-byte id buys a lead with a 128-byte id: its
/// `buy:<lead>:<pro>` spend is taken from its budget.
#[test]
fn r21_an_auto_buy_on_128_byte_ids_is_bought_within_the_budget() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        let (l, p) = longest_ids();
        ok(&e, buyer(&p, None)).await;
        let out = serde_json::to_value(ok(&e, publish(&l, "madrid", true, T0)).await).unwrap();
        assert_eq!(out["offers"], json!([[p, "auto_buy"]]), "{out}");
        assert_eq!(budget(&e, &p).available, 12, "bought at 12");
    });
}

// ---------------------------------------------------------------------------------
// Top-up rules (R10)
// ---------------------------------------------------------------------------------

/// R10: a bad top-up rule is refused naming the field of the request that is wrong.
#[test]
fn r10_a_bad_topup_rule_is_refused_naming_the_rule_field() {
    with_engine("zaask.toml", "zaask", |e| async move {
        zaask_pro(&e, "p1").await;
        let over = rota::core::MAX_CREDITS + 1;
        for (rule, field) in [
            (json!({"threshold_credits": 0, "amount_credits": 50}), "rule.threshold_credits"),
            (json!({"threshold_credits": 10, "amount_credits": 0}), "rule.amount_credits"),
            (json!({"threshold_credits": over, "amount_credits": 50}), "rule.threshold_credits"),
            (json!({"threshold_credits": 10, "amount_credits": over}), "rule.amount_credits"),
        ] {
            let v = json!({"type": "set_topup_rule", "pro": "p1", "rule": rule});
            let err = send(&e, v).await.unwrap_err();
            assert_eq!((err.code.as_ref(), err.field.as_deref()), ("invalid_field", Some(field)), "{err:?}");
        }
        for credits in [0, over] {
            let v = json!({"type": "grant_credits", "pro": "p1", "op": "pay-2", "credits": credits});
            let err = send(&e, v).await.unwrap_err();
            assert_eq!(
                (err.code.as_ref(), err.field.as_deref()),
                ("invalid_field", Some("credits")),
                "{err:?}"
            );
        }
        assert_eq!(balance(&e, "p1").granted, 100, "nothing granted");
        // A bad pro id is refused before a rule creates an account (or a record) for it.
        let (accounts, logged) = (e.inner.ledger.snapshot().tenants().count(), e.inner.wal.last_seq());
        for pro in [json!(""), json!("x".repeat(129))] {
            let v = json!({"type": "set_topup_rule", "pro": pro, "rule": null});
            let err = send(&e, v).await.unwrap_err();
            assert_eq!((err.code.as_ref(), err.field.as_deref()), ("invalid_field", Some("pro")), "{err:?}");
        }
        assert_eq!((e.inner.ledger.snapshot().tenants().count(), e.inner.wal.last_seq()), (accounts, logged));
    });
}

/// R10: top-up rule changes within one millisecond (the manual clock does not move)
/// are each a change, not an idempotency conflict, and the last one wins, a change
/// back to the first rule included.
#[test]
fn r10_topup_rule_changes_in_one_millisecond_all_apply_and_the_last_wins() {
    with_engine("zaask.toml", "zaask", |e| async move {
        zaask_pro(&e, "p1").await;
        let rule = |t: u64| json!({"type": "set_topup_rule", "pro": "p1", "rule": {"threshold_credits": t, "amount_credits": 50}});
        for t in [10, 20, 10] {
            ok(&e, rule(t)).await;
        }
        assert_eq!(balance(&e, "p1").topup_rule, Some(TopupRule { threshold: 10, amount: 50 }));
        ok(&e, json!({"type": "set_topup_rule", "pro": "p1", "rule": null})).await;
        assert_eq!(balance(&e, "p1").topup_rule, None, "removed");
    });
}

// ---------------------------------------------------------------------------------
// Resumes (R20, R24)
// ---------------------------------------------------------------------------------

/// R20/R24, hard budgets: a config resumed early (its `paused_until` moved into the
/// past) is recharged once, not a second time by the next housekeeping.
#[test]
fn r20_r24_an_early_resume_recharges_the_budget_once() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", None)).await;
        assert_eq!(budget(&e, "b1").available, 24);
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + MIN})).await;
        ok(&e, buyer("b1", Some(T0 + 5 * DAY))).await; // paused
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 2 * MIN})).await;
        ok(&e, buyer("b1", Some(T0 + 90_000))).await; // resumed early: recharged (R24)
        let resumed = budget(&e, "b1");
        assert_eq!(resumed.period, 2, "the resume recharged");
        // Two leads spend the week's budget.
        ok(&e, publish("A1", "madrid", true, T0 + 2 * MIN)).await;
        ok(&e, publish("A2", "madrid", true, T0 + 2 * MIN + 1)).await;
        assert_eq!(budget(&e, "b1").available, 0, "24 spent");
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 3 * MIN})).await;
        let b = budget(&e, "b1");
        assert_eq!(
            (b.period, b.available),
            (resumed.period, 0),
            "the same resume recharged twice: 48 credits spendable in a week of 24"
        );
    });
}

/// R20/R24: the week's recharge and a resume that the housekeeping applies together
/// are one closing of the gate and one record: no spend can come between them (the
/// second would top it up again).
#[test]
fn r20_r24_a_weeks_recharge_and_a_resume_are_one_record() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        // Paused until Wednesday: no budget before it.
        ok(&e, buyer("b1", Some(T0 + 2 * DAY))).await;
        assert_eq!(budget(&e, "b1").period, 0, "paused: not recharged");
        let before = e.inner.wal.last_seq();
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 2 * DAY + HOUR})).await;
        let b = budget(&e, "b1");
        assert_eq!((b.period, b.available), (2, 24), "this week's recharge and the resume: {b:?}");
        assert_eq!(e.inner.wal.last_seq(), before + 1, "both in one record");
    });
}

/// R24: a pause lifted by removing `paused_until` recharges at once, once.
#[test]
fn r24_a_pause_lifted_by_removing_its_end_recharges_once() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", None)).await;
        ok(&e, publish("A1", "madrid", true, T0)).await;
        ok(&e, buyer("b1", Some(T0 + 5 * DAY))).await; // paused with 12 left
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + MIN})).await;
        ok(&e, buyer("b1", None)).await; // resumed: topped up to 24 (R20)
        let b = budget(&e, "b1");
        assert_eq!((b.period, b.available), (2, 24), "{b:?}");
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 6 * DAY})).await;
        assert_eq!(budget(&e, "b1").period, 2, "no second recharge for the same resume");
    });
}

/// R20/R24, hard budgets: a config paused through Monday's housekeeping (which skips
/// it) and resumed by a profile update later in the week gets this week's recharge
/// with its resume; the next housekeeping gave it the week's recharge again (48
/// credits spendable in a week of 24).
#[test]
fn r20_r24_a_config_resumed_by_an_update_after_a_paused_monday_gets_one_budget() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", Some(T0 + 5 * DAY))).await;
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + MIN})).await;
        assert_eq!(budget(&e, "b1").available, 0, "paused through Monday: not recharged");
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + DAY})).await;
        ok(&e, buyer("b1", None)).await;
        assert_eq!(budget(&e, "b1").available, 24, "resumed: the week's budget");
        ok(&e, publish("A1", "madrid", true, T0 + DAY)).await;
        ok(&e, publish("A2", "madrid", true, T0 + DAY + 1)).await;
        assert_eq!(budget(&e, "b1").available, 0, "the week's 24 spent");
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + DAY + MIN})).await;
        assert_eq!(budget(&e, "b1").available, 0, "no second budget in the same week");
    });
}

/// R19: a weekly amount set back within one millisecond (24, 48, 24) ends at 24: each
/// setting is numbered, where an id of time and amount made the third a repeat of the
/// first, answered `done` and ignored (every later recharge then topped up to 48).
#[test]
fn r19_a_weekly_budget_set_back_within_a_millisecond_takes_effect() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        let weekly = |credits: u64| {
            json!({"type": "upsert_pro", "pro": {"id": "b1", "categories": ["painting"], "zones": ["madrid"],
                "autobuy": [{"name": "main", "zones": ["madrid"], "categories": ["painting"],
                             "weekly_budget_credits": credits}]}})
        };
        for credits in [24, 48, 24] {
            ok(&e, weekly(credits)).await;
            assert_eq!(budget(&e, "b1").weekly_budget, credits);
        }
        assert_eq!(budget(&e, "b1").settings, 3);
    });
}

/// Pro `x` with two configs, `a` buying and `b` paused until `paused` (if set).
fn two_configs(paused: Option<i64>) -> Value {
    json!({"type": "upsert_pro", "pro": {"id": "x", "categories": ["painting"], "zones": ["madrid"],
        "autobuy": [
            {"name": "a", "zones": ["madrid"], "categories": ["painting"], "weekly_budget_credits": 24},
            {"name": "b", "zones": ["madrid"], "categories": ["painting"], "weekly_budget_credits": 24,
             "paused_until": paused}]}})
}

/// Config `b` of pro `x`.
fn config_b(e: &Engine) -> rota::ledger::BudgetBalance {
    e.inner.ledger.budget(&acme(), &ProId::new("x"), &BudgetName::new("b")).unwrap()
}

/// `x` with `a` spent by two leads and `b` paused until the next morning with its 24
/// untouched: S1, an hour later, finds nothing x can buy from (x short, parked).
async fn x_misses_s1_with_b_paused(e: &Engine) {
    ok(e, two_configs(None)).await;
    ok(e, json!({"type": "advance_clock", "to_ms": T0 + MIN})).await;
    ok(e, two_configs(Some(T0 + 20 * HOUR))).await;
    ok(e, publish("A1", "madrid", true, T0 + MIN)).await;
    ok(e, publish("A2", "madrid", true, T0 + MIN + 1)).await;
    assert_eq!(config_b(e).available, 24);
    ok(e, json!({"type": "advance_clock", "to_ms": T0 + HOUR})).await;
    let s1 = ok(e, publish("S1", "madrid", true, T0 + HOUR)).await;
    assert!(format!("{s1:?}").contains("offers: []"), "x could buy from nothing: {s1:?}");
}

/// R22/R24: a buyer whose buying config is spent is parked until budget comes back; a
/// second config, full but paused, resuming by itself is budget back too: the buyer
/// gets the short lead it missed and the next ones (it stayed parked until the next
/// recharge of the first).
#[test]
fn r22_r24_a_paused_config_resuming_with_its_budget_unparks_the_buyer() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        x_misses_s1_with_b_paused(&e).await;
        let b = config_b;
        // The next morning b buys again, and x gets S1 from it (R22, within the retry
        // window).
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 20 * HOUR + MIN})).await;
        assert_eq!(b(&e).available, 12, "S1 bought from b");
        ok(&e, publish("L2", "madrid", true, T0 + 20 * HOUR + MIN)).await;
        assert_eq!(b(&e).available, 0, "and the next lead");
    });
}

/// R22/R24: budget that comes back through the profile (a paused config resumed early
/// by an update) retries the leads the buyer missed, as a recharge or a refund does:
/// the update's recharge left the week's housekeeping nothing to do, and the short
/// lead was never retried.
#[test]
fn r22_r24_a_config_resumed_by_an_update_retries_the_leads_the_buyer_missed() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        x_misses_s1_with_b_paused(&e).await;
        let b = config_b;
        // b resumed by an update two hours later, well within the retry window.
        ok(&e, two_configs(None)).await;
        assert_eq!(b(&e).available, 24);
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 2 * HOUR})).await;
        assert_eq!(b(&e).available, 12, "S1 bought from b once its budget came back");
    });
}

/// R22: the retry a profile update queues (budget back) is in memory until it runs; a
/// crash before then must not lose it. After the restart the buyer, short of budget
/// (no longer parked: the update put it back in the scan), is retried like a parked
/// one, and gets the lead it missed.
#[test]
fn r22_a_retry_queued_by_a_profile_update_survives_a_crash_before_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    let start = || {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        Engine::start_with_fs(config(dir.path(), "habitissimo.toml", "habitissimo"), handle)
            .expect("starts")
            .0
    };
    in_system(async {
        let e = start();
        x_misses_s1_with_b_paused(&e).await;
        ok(&e, two_configs(None)).await;
        assert_eq!(config_b(&e).available, 24, "resumed; its retry not run yet");
    });
    fs.power_cut();
    in_system(async {
        let e = start();
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 2 * HOUR})).await;
        assert_eq!(config_b(&e).available, 12, "S1 bought from b after the restart");
    });
}

/// R20/R24, hard budgets: a new config whose pause is already over (a profile sent
/// again with a past `paused_until`) gets one budget in its first week: its first
/// recharge is its resume too, so the housekeeping does not recharge that resume
/// again (it did: 48 credits spendable in a week of 24).
#[test]
fn r20_r24_a_new_config_whose_pause_is_over_gets_one_budget_in_its_week() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", Some(T0 - DAY))).await;
        assert_eq!(budget(&e, "b1").available, 24);
        ok(&e, publish("A1", "madrid", true, T0)).await;
        ok(&e, publish("A2", "madrid", true, T0 + 1)).await;
        assert_eq!(budget(&e, "b1").available, 0, "the week's 24 spent");
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + MIN})).await;
        assert_eq!(budget(&e, "b1").available, 0, "no second budget in the same week");
        // The next Monday recharges as usual; the shipped week-long guarantee (R12)
        // then refunds both purchases, never viewed, into the new week.
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 7 * DAY})).await;
        let b = budget(&e, "b1");
        assert_eq!((b.available, b.refunded), (24 + 24, 24), "the next week's budget, and the refunds");
    });
}

// ---------------------------------------------------------------------------------
// The publish reply says what was bought (R1)
// ---------------------------------------------------------------------------------

/// R1/R21: when the ledger refuses an auto-buy spend the core decided (another shard
/// spent the budget between the core's read and the spend; here, deterministically,
/// the spend's op id was already used for another amount), the buyer is taken out of
/// the decision, and out of the publish reply: the reply lists what was bought, and a
/// republish answers the same.
#[test]
fn r1_r21_a_publish_reply_lists_only_the_buyers_the_ledger_charged() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", None)).await;
        ok(&e, buyer("b2", None)).await;
        let op = OpId::for_lead("buy", &rota::ids::LeadId::new("A1"), &ProId::new("b2"));
        e.inner.ledger.spend(op, &acme(), &ProId::new("b2"), &BudgetName::new("main"), 1).unwrap();
        let first = serde_json::to_value(ok(&e, publish("A1", "madrid", true, T0)).await).unwrap();
        assert_eq!(first["offers"], json!([["b1", "auto_buy"]]), "b2's spend was refused: {first}");
        assert_eq!(budget(&e, "b2").spent, 1, "nothing more spent for b2");
        let again = serde_json::to_value(ok(&e, publish("A1", "madrid", true, T0)).await).unwrap();
        assert_eq!(first, again, "a republish answers what the publish answered");
    });
}

/// R5/R21 under auto-buy: a direct target buys the lead from its own budget (the
/// client chose it, and the budget pays for every lead of the tenant), the publish
/// reply lists it; one whose spend the ledger refuses does not get it, and the reply
/// and a republish say so.
#[test]
fn r5_r21_an_auto_buy_direct_target_pays_from_its_budget_or_does_not_get_the_lead() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", None)).await;
        ok(&e, buyer("b2", None)).await;
        // Two clients (the client id comes from the creation time).
        let direct = |id: &str, pro: &str, at: i64| {
            let mut l = lead(id, "madrid", true, at);
            l["direct"] = json!([pro]);
            json!({"type": "publish_lead", "lead": l})
        };
        let out = serde_json::to_value(ok(&e, direct("A1", "b1", T0)).await).unwrap();
        assert_eq!(out["offers"][0], json!(["b1", "direct"]), "{out}");
        assert_eq!(budget(&e, "b1").spent, 12, "the direct target bought it at 12");
        // b2's spend for A2 refused by the ledger (its op id already used for another
        // amount): b2 is taken out of the decision.
        let op = OpId::for_lead("buy", &rota::ids::LeadId::new("A2"), &ProId::new("b2"));
        e.inner.ledger.spend(op, &acme(), &ProId::new("b2"), &BudgetName::new("main"), 1).unwrap();
        let before = budget(&e, "b2").spent;
        let first = serde_json::to_value(ok(&e, direct("A2", "b2", T0 + 1)).await).unwrap();
        assert_eq!(first["status"], "accepted", "{first}");
        let offers = first["offers"].as_array().unwrap();
        assert!(!offers.iter().any(|o| o[0] == "b2"), "b2 could not pay: {first}");
        assert_eq!(budget(&e, "b2").spent, before, "nothing more spent for b2");
        let again = serde_json::to_value(ok(&e, direct("A2", "b2", T0 + 1)).await).unwrap();
        assert_eq!(first, again, "a republish answers what the publish answered");
    });
}

/// R5/R6/R21: a direct target whose purchase the ledger refuses after the decision (a
/// spend of its budget lost to another shard, here its op id already used) did not
/// receive the lead and holds none of its seats: the others keep all four.
#[test]
fn r5_r6_a_direct_target_whose_purchase_is_refused_holds_no_seat() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", None)).await;
        let op = OpId::for_lead("buy", &rota::ids::LeadId::new("A1"), &ProId::new("b1"));
        e.inner.ledger.spend(op, &acme(), &ProId::new("b1"), &BudgetName::new("main"), 1).unwrap();
        assert!(budget(&e, "b1").available >= 12, "the decision finds b1 able to buy");
        let mut l = lead("A1", "madrid", true, T0);
        l["direct"] = json!(["b1"]);
        let out = serde_json::to_value(ok(&e, json!({"type": "publish_lead", "lead": l})).await).unwrap();
        assert!(!out["offers"].as_array().unwrap().iter().any(|o| o[0] == "b1"), "b1 did not buy: {out}");
        let x = serde_json::to_value(ok(&e, json!({"type": "explain", "lead": "A1"})).await).unwrap();
        assert_eq!(x["generic_cap"], 4, "no seat held for b1: {x}");
    });
}

/// Buyers `b1`..`b5` in Madrid, and lead `A1` naming `b1` as its direct target, whose
/// purchase the ledger refuses after the decision (its op id already used, as a spend
/// another shard made first would): the publish's answer.
async fn publish_with_a_lost_direct_target(e: &Engine) -> Value {
    for b in ["b1", "b2", "b3", "b4", "b5"] {
        ok(e, buyer(b, None)).await;
    }
    let op = OpId::for_lead("buy", &LeadId::new("A1"), &ProId::new("b1"));
    e.inner.ledger.spend(op, &acme(), &ProId::new("b1"), &BudgetName::new("main"), 1).unwrap();
    let mut l = lead("A1", "madrid", true, T0);
    l["direct"] = json!(["b1"]);
    serde_json::to_value(ok(e, json!({"type": "publish_lead", "lead": l})).await).unwrap()
}

/// The pros the lead's explanation lists as offered, and what they spent on it.
async fn bought(e: &Engine) -> (Vec<String>, u64) {
    let (pros, _) = offered_pros(e, "A1").await;
    let spent = ["b1", "b2", "b3", "b4", "b5"].iter().map(|b| budget(e, b).spent).sum::<u64>();
    (pros, spent)
}

/// R5/R6/R21: the release of a publish whose direct target's purchase the ledger
/// refused is planned again without it: the other buyers get all four seats of the
/// group in the same decision (the release planned with the target holding a seat
/// bought only three), and the answer lists them.
#[test]
fn r5_r6_r21_a_lost_direct_target_gives_its_seat_to_the_release_of_the_same_decision() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        let out = publish_with_a_lost_direct_target(&e).await;
        let offers: Vec<&str> =
            out["offers"].as_array().unwrap().iter().map(|o| o[0].as_str().unwrap()).collect();
        assert_eq!(offers.len(), 4, "a full group bought it: {out}");
        assert!(!offers.contains(&"b1"), "b1 could not pay: {out}");
        let (pros, spent) = bought(&e).await;
        assert_eq!(pros.len(), 4, "{pros:?}");
        assert_eq!(spent, 1 + 4 * 12, "each buyer paid the price once (and b1 the injected spend)");
        let mut l = lead("A1", "madrid", true, T0);
        l["direct"] = json!(["b1"]);
        let again = serde_json::to_value(ok(&e, json!({"type": "publish_lead", "lead": l})).await).unwrap();
        assert_eq!(again, out, "a republish answers what the publish answered");
        // One refused spend did not park b1 (it has 23 of its 24 left): it keeps its
        // turn, and buys the next lead.
        let next = serde_json::to_value(ok(&e, publish("A2", "madrid", true, T0 + 1)).await).unwrap();
        let buyers: Vec<&str> =
            next["offers"].as_array().unwrap().iter().map(|o| o[0].as_str().unwrap()).collect();
        assert!(buyers.contains(&"b1"), "b1 buys A2: {next}");
    });
}

/// R5/R6/R21: with a head start, a publish whose only direct target's purchase the
/// ledger refused gives no head start to anyone: released in the same decision, not
/// after a head start nobody holds.
#[test]
fn r5_r21_a_lost_direct_target_leaves_no_head_start_to_wait_out() {
    with_engine_changed("habitissimo.toml", "habitissimo", &[("head_start_s", "3600")], |e| async move {
        let out = publish_with_a_lost_direct_target(&e).await;
        assert_eq!(out["release_at"], json!(T0), "released at once: {out}");
        assert_eq!(out["offers"].as_array().unwrap().len(), 4, "{out}");
        let (pros, spent) = bought(&e).await;
        assert_eq!((pros.len(), spent), (4, 1 + 4 * 12), "{pros:?}");
    });
}

/// Runs `f` on an engine started with `cfg` on what `fs` holds; the engine is then
/// abandoned, as after a power cut.
fn life_on<T>(fs: &MemFs, cfg: &Config, f: impl AsyncFnOnce(&Engine) -> T) -> T {
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(cfg.clone(), handle).expect("rota starts on what the disk kept");
        f(&e).await
    })
}

/// Sweeps a power cut over every disk operation of `change` (an `upsert_pro` of `b1`
/// making its config `main` buy), made after `setup`; after each cut, restarts, lets
/// `b1` buy a lead if the cut change already put it in the rotation, and sends the
/// change again a minute later: the budget is topped up to the week's 24 once, so what
/// `b1` bought stays spent.
fn a_change_cut_off_and_sent_again_tops_up_once(setup: &[Value], change: &Value) {
    for k in 1.. {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "habitissimo.toml", "habitissimo");
        let fs = MemFs::new();
        life_on(&fs, &cfg, async |e| {
            for v in setup {
                ok(e, v.clone()).await;
            }
            fs.cut_power_after(k);
            if let Err(err) = send(e, change.clone()).await {
                assert_eq!(err.code, "unavailable", "cut after {k}: {err:?}");
            }
        });
        if fs.power_cuts() == 0 {
            assert!(k > 3, "the sweep cut the change at {} points only", k - 1);
            break;
        }
        life_on(&fs, &cfg, async |e| {
            let out = serde_json::to_value(ok(e, publish("A1", "madrid", true, T0)).await).unwrap();
            let bought = out["offers"].as_array().unwrap().iter().any(|o| o[0] == "b1");
            ok(e, json!({"type": "advance_clock", "to_ms": T0 + MIN})).await;
            ok(e, change.clone()).await;
            let b = budget(e, "b1");
            let spent = if bought { 12 } else { 0 };
            assert_eq!(b.available, 24 - spent, "cut after {k} disk operations (b1 bought: {bought}): {b:?}");
        });
    }
}

/// R20: a new auto-buy config's first recharge, made by an `upsert_pro` cut off midway
/// and sent again, is not made twice (the directory, written last, did not know the
/// config; the budget was taken for resumed, and topped up again).
#[test]
fn r20_a_new_config_cut_off_midway_and_sent_again_is_topped_up_once() {
    let setup: Vec<Value> = ["b2", "b3", "b4"].iter().map(|b| buyer(b, None)).collect();
    a_change_cut_off_and_sent_again_tops_up_once(&setup, &buyer("b1", None));
}

/// R20/R24: a config made active again is topped up once on that day: the same change
/// sent again after a cut is a repeat (its recharge was keyed on the time of each
/// attempt).
#[test]
fn r20_r24_a_reactivation_cut_off_midway_and_sent_again_is_topped_up_once() {
    let mut off = buyer("b1", None);
    off["pro"]["autobuy"][0]["active"] = json!(false);
    let setup: Vec<Value> = ["b2", "b3", "b4"].iter().map(|b| buyer(b, None)).chain([off]).collect();
    a_change_cut_off_and_sent_again_tops_up_once(&setup, &buyer("b1", None));
}

/// R1/R2: a lead the quality gate refused is remembered for the retention after its
/// lifetime would have ended, as an accepted lead is: published again unchanged once
/// the reason is gone (here the competitor it came from removed) but within its
/// lifetime, it is answered as refused, not accepted and dispatched after the
/// platform was told it was refused. (Remembered for the retention after the refusal
/// only, it was forgotten at day 7 of a 30-day lifetime.)
#[test]
fn r1_r2_a_refused_lead_is_remembered_for_as_long_as_it_could_be_published() {
    let changes = [("lead_ttl_s", "2592000"), ("idempotency_retention_s", "604800")];
    with_engine_changed("habitissimo.toml", "habitissimo", &changes, |e| async move {
        ok(&e, buyer("c1", None)).await;
        for b in ["b1", "b2", "b3", "b4"] {
            ok(&e, buyer(b, None)).await;
        }
        let mut l = lead("L1", "madrid", true, T0);
        l["client"]["pro_id"] = json!("c1");
        let republish = json!({"type": "publish_lead", "lead": l});
        let refused = serde_json::to_value(ok(&e, republish.clone()).await).unwrap();
        assert_eq!(
            (refused["status"].as_str(), refused["reason"].as_str()),
            (Some("rejected"), Some("competitor"))
        );
        ok(&e, json!({"type": "remove_pro", "pro": "c1"})).await;
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 8 * DAY})).await;
        let again = serde_json::to_value(ok(&e, republish.clone()).await).unwrap();
        assert_eq!(again, refused, "answered as the first publish was");
        assert!(bought_by_any(&e).await.is_none(), "nobody bought the refused lead");
        // Once its lifetime and the retention after it are over, it is forgotten; sent
        // again it is past its lifetime.
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 38 * DAY})).await;
        let late = send(&e, republish).await.unwrap_err();
        assert_eq!(late.code, "lead_expired", "{late:?}");
    });
}

/// What was spent from the budgets of `b1`..`b4`, if anything.
async fn bought_by_any(e: &Engine) -> Option<u64> {
    let spent: u64 = ["b1", "b2", "b3", "b4"].iter().map(|b| budget(e, b).spent).sum();
    (spent > 0).then_some(spent)
}

/// Monday 2025-12-01 00:00 in Madrid (habitissimo's time zone), the first week start
/// after `T0` (Monday 2025-11-24, 17:00 there).
const NEXT_MONDAY: i64 = 1_764_543_600_000;

/// R20: a budget is topped up for its week; once the week is over, what is left of it
/// is not spent (it is last week's), until the weekly recharge. A lead that comes in
/// the moments between (the housekeeping makes the recharge at the week's start) finds
/// no buyer able to pay, and gets its buyers from the new week's budgets when the
/// recharge comes (R22). Before, the buyers spent last week's leftover and were then
/// topped up to the full week anyway: 12 credits a buyer beyond its weekly budget.
#[test]
fn r20_r22_last_weeks_leftover_is_not_spent_after_the_week_turns() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        let buyers = ["b1", "b2", "b3", "b4"];
        for b in buyers {
            ok(&e, buyer(b, None)).await;
        }
        ok(&e, publish("A1", "madrid", true, T0)).await;
        for b in buyers {
            assert_eq!(budget(&e, b).available, 12, "{b} bought A1 at 12 of its 24");
        }
        // The week turns; a lead comes before the housekeeping has run.
        e.inner.clock.advance_to(NEXT_MONDAY + 1_000);
        let out =
            serde_json::to_value(ok(&e, publish("A2", "madrid", true, NEXT_MONDAY + 1_000)).await).unwrap();
        assert_eq!(out["offers"], json!([]), "nobody buys from last week's budget: {out}");
        for b in buyers {
            assert_eq!(budget(&e, b).available, 12, "{b}'s leftover untouched");
        }
        // The housekeeping: the weekly recharge, then the lead retried (R22).
        ok(&e, json!({"type": "advance_clock", "to_ms": NEXT_MONDAY + 2_000})).await;
        for b in buyers {
            let bb = budget(&e, b);
            assert_eq!((bb.period, bb.available, bb.spent), (2, 12, 12), "{b} bought A2 from this week's 24");
        }
        let (offered, _) = offered_pros(&e, "A2").await;
        assert_eq!(offered.len(), 4, "{offered:?}");
    });
}

/// R20/R24: the housekeeping is next due at the earliest of a week's start and the end
/// of an auto-buy pause (its resume recharges), including a pause set after the
/// directory was last looked through; a pause already over is not waited for.
#[test]
fn r20_r24_the_housekeeping_is_due_at_the_next_week_start_or_pause_end() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        assert_eq!(
            e.housekeeping_due(e.next_housekeeping_at(T0)),
            Some(NEXT_MONDAY),
            "no pause: the week's start"
        );
        ok(&e, buyer("b1", Some(T0 + 2 * HOUR))).await;
        ok(&e, buyer("b2", Some(T0 - HOUR))).await;
        let mut off = buyer("b4", Some(T0 + MIN));
        off["pro"]["autobuy"][0]["active"] = json!(false);
        ok(&e, off).await;
        let looked = e.next_housekeeping_at(T0);
        assert_eq!(looked, Some(T0 + 2 * HOUR), "b1's pause ends first (b4's is off: it does not resume)");
        ok(&e, buyer("b3", Some(T0 + HOUR))).await;
        assert_eq!(e.housekeeping_due(looked), Some(T0 + HOUR), "b3's pause, set since");
        // A housekeeping that started before a pause's end and ran past it: that end is
        // still due (a time already past, run at once), not skipped for the next one.
        assert_eq!(e.next_housekeeping_at(T0 + HOUR - 1), Some(T0 + HOUR));
    });
}

/// R12/R20: a guarantee's refund dated before the week's end but decided after it (the
/// shard's tick ran late, before the week's recharge) goes to the new week: dated at
/// its deadline, it went to the week the recharge then replaced, and was lost.
#[test]
fn r12_r20_a_refund_dated_in_last_week_but_decided_after_it_goes_to_the_new_week() {
    // The guarantee of a purchase at T0 ends a second before the week does.
    let window = ((NEXT_MONDAY - 1_000 - T0) / 1_000).to_string();
    with_engine_changed(
        "habitissimo.toml",
        "habitissimo",
        &[("guarantee_window_s", &window)],
        |e| async move {
            let buyers = ["b1", "b2", "b3", "b4"];
            for b in buyers {
                ok(&e, buyer(b, None)).await;
            }
            ok(&e, publish("A1", "madrid", true, T0)).await;
            // The week turns, and the shard's tick runs before the housekeeping.
            e.inner.clock.advance_to(NEXT_MONDAY + 1_000);
            let key = rota::ids::ShardKey {
                tenant: acme(),
                zone: rota::ids::ZoneId::new("madrid"),
                category: rota::ids::CategoryId::new("painting"),
            };
            e.exec(key, rota::core::Command::Tick).await.expect("the tick runs");
            ok(&e, json!({"type": "advance_clock", "to_ms": NEXT_MONDAY + 2_000})).await;
            for b in buyers {
                let bb = budget(&e, b);
                assert_eq!(
                    (bb.period, bb.available),
                    (2, 24 + 12),
                    "{b}: the week's 24 and the refund of A1"
                );
            }
        },
    );
}

/// The pros offered lead `lead` (its explanation), and how many entries it has.
async fn offered_pros(e: &Engine, lead: &str) -> (Vec<String>, usize) {
    let x = serde_json::to_value(ok(e, json!({"type": "explain", "lead": lead})).await).unwrap();
    let entries = x["entries"].as_array().unwrap();
    let offered = entries
        .iter()
        .filter(|o| o["outcome"] == "offered")
        .map(|o| o["pro"].as_str().unwrap().to_string())
        .collect();
    (offered, entries.len())
}

/// R1/R2: a lead id the quality gate refused is taken until its publish is forgotten:
/// published again in another zone it is an idempotency conflict, not a second lead
/// (which took the refused one's index entry, and later lost its own when the refused
/// one was forgotten: offer actions then answered `unknown_lead`).
#[test]
fn r1_r2_a_refused_lead_id_published_in_another_zone_is_a_conflict() {
    with_engine("zaask.toml", "zaask", |e| async move {
        zaask_pro(&e, "p1").await;
        let mut l = lead("L1", "lisboa", true, T0);
        l["client"]["phone_verified"] = json!(false);
        let refused =
            serde_json::to_value(ok(&e, json!({"type": "publish_lead", "lead": l.clone()})).await).unwrap();
        assert_eq!(
            (refused["status"].as_str(), refused["reason"].as_str()),
            (Some("rejected"), Some("phone_unverified"))
        );
        let err = send(&e, publish("L1", "porto", true, T0)).await.unwrap_err();
        assert_eq!(err.code, "idempotency_conflict", "{err:?}");
        // The refused publish sent again to its own zone answers as before.
        let again = serde_json::to_value(ok(&e, json!({"type": "publish_lead", "lead": l})).await).unwrap();
        assert_eq!(again, refused);
    });
}

// ---------------------------------------------------------------------------------
// Lead ids published again once forgotten (R1, R9, R21)
// ---------------------------------------------------------------------------------

/// The lead's close at 48 h, then its forgetting 7 days later (guarantee and
/// retention over), in two steps.
async fn forget_leads_of_t0(e: &Engine) -> i64 {
    ok(e, json!({"type": "advance_clock", "to_ms": T0 + 3 * DAY})).await;
    let later = T0 + 10 * DAY;
    ok(e, json!({"type": "advance_clock", "to_ms": later})).await;
    later
}

/// R1/R9: once a lead id is forgotten (idempotency retention over), publishing it
/// again is a new lead, and responding to it costs the price again; the ledger forgot
/// the old lead's ops with it.
#[test]
fn r1_r9_a_lead_id_published_again_after_retention_is_charged_again() {
    with_engine("zaask.toml", "zaask", |e| async move {
        zaask_pro(&e, "p1").await;
        let baseline = e.inner.ledger.registered_ops();
        ok(&e, publish("L1", "lisboa", true, T0)).await;
        ok(&e, offer("L1", "p1", "respond")).await;
        ok(&e, offer("L1", "p1", "client_viewed")).await;
        let first = balance(&e, "p1").captured;
        assert!(first > 0);
        let later = forget_leads_of_t0(&e).await;
        let gone = send(&e, json!({"type": "explain", "lead": "L1"})).await.unwrap_err();
        assert_eq!(gone.code, "unknown_lead", "the lead id was forgotten");
        assert_eq!(e.inner.ledger.registered_ops(), baseline, "the lead's op ids were forgotten");
        ok(&e, publish("L1", "lisboa", true, later)).await;
        ok(&e, offer("L1", "p1", "respond")).await;
        assert_eq!(balance(&e, "p1").captured, 2 * first, "the second response was charged");
        ok(&e, offer("L1", "p1", "respond")).await;
        assert_eq!(balance(&e, "p1").captured, 2 * first, "and a repeat of it was not");
    });
}

/// R9/R12: the same for a chat-only lead whose first hold was captured when the client
/// replied (and so not refunded: a reply is a view): the new lead's hold is taken, and
/// captured when the client replies.
#[test]
fn r9_r12_a_chat_only_lead_id_published_again_after_retention_is_held_and_captured_again() {
    with_engine("zaask.toml", "zaask", |e| async move {
        zaask_pro(&e, "p1").await;
        let baseline = e.inner.ledger.registered_ops();
        ok(&e, publish("L1", "lisboa", false, T0)).await;
        ok(&e, offer("L1", "p1", "respond")).await;
        ok(&e, offer("L1", "p1", "client_replied")).await;
        let price = balance(&e, "p1").captured;
        assert!(price > 0);
        let later = forget_leads_of_t0(&e).await;
        let b = balance(&e, "p1");
        assert_eq!(
            (b.captured, b.refunded, b.available),
            (price, 0, 100 - price),
            "the client replied, so it saw the proposal: kept (R12)"
        );
        assert_eq!(e.inner.ledger.registered_ops(), baseline, "the lead's op ids were forgotten");
        ok(&e, publish("L1", "lisboa", false, later)).await;
        ok(&e, offer("L1", "p1", "respond")).await;
        assert_eq!(balance(&e, "p1").held, price, "held again");
        ok(&e, offer("L1", "p1", "client_replied")).await;
        let b = balance(&e, "p1");
        assert_eq!((b.held, b.captured, b.available), (0, 2 * price, 100 - 2 * price), "captured again");
    });
}

/// R21: an auto-buy lead id published again after retention is bought again from the
/// budget.
#[test]
fn r21_an_auto_buy_lead_id_published_again_after_retention_is_bought_again() {
    with_engine("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", None)).await;
        ok(&e, publish("A1", "madrid", true, T0)).await;
        ok(&e, offer("A1", "b1", "respond")).await;
        ok(&e, offer("A1", "b1", "client_viewed")).await;
        assert_eq!(budget(&e, "b1").available, 12);
        let later = forget_leads_of_t0(&e).await;
        // A new week since: recharged to 24.
        let before = budget(&e, "b1");
        assert_eq!(before.available, 24, "{before:?}");
        let out = serde_json::to_value(ok(&e, publish("A1", "madrid", true, later)).await).unwrap();
        assert_eq!(out["offers"], json!([["b1", "auto_buy"]]), "{out}");
        assert_eq!(budget(&e, "b1").available, 12, "bought again at 12");
    });
}

/// R9/R12: recovery forgets a forgotten lead's op ids where the live engine did (after
/// the ledger facts of the same record: here a guarantee refund and the forgetting in
/// one tick), so the ledger it rebuilds, op ids included, is the one that ran, and a
/// lead id published again is charged again after a restart too.
#[test]
fn r9_r12_recovery_rebuilds_the_ledger_that_forgot_a_leads_op_ids() {
    for snapshot in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let fs = MemFs::new();
        let start = || {
            let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
            Engine::start_with_fs(config(dir.path(), "zaask.toml", "zaask"), handle).expect("starts").0
        };
        let ran = in_system(async {
            let e = start();
            zaask_pro(&e, "p1").await;
            if snapshot {
                e.snapshot().expect("snapshot");
            }
            ok(&e, publish("L1", "lisboa", true, T0)).await;
            ok(&e, offer("L1", "p1", "respond")).await;
            // Closed at 48 h; at 10 days the guarantee refund (never viewed, due at 7
            // days) and the forgetting (at 9 days) come in one tick.
            let price = balance(&e, "p1").captured;
            let later = forget_leads_of_t0(&e).await;
            let b = balance(&e, "p1");
            assert_eq!((b.captured, b.refunded), (price, price), "refunded (R12)");
            ok(&e, publish("L1", "lisboa", true, later)).await;
            ok(&e, offer("L1", "p1", "respond")).await;
            assert_eq!(balance(&e, "p1").captured, 2 * price, "charged again");
            e.inner.ledger.snapshot()
        });
        let recovered = in_system(async {
            let e = start();
            let rebuilt = e.inner.ledger.snapshot();
            let captured = balance(&e, "p1").captured;
            ok(&e, offer("L1", "p1", "respond")).await;
            assert_eq!(balance(&e, "p1").captured, captured, "a repeat after the restart charges nothing");
            rebuilt
        });
        assert!(ran == recovered, "the recovered ledger differs (snapshot: {snapshot})");
    }
}

/// R1/R9 after an upgrade: a snapshot of a release that never forgot a lead's op ids
/// holds those of leads its shards had forgotten. A start from it forgets them, and
/// keeps those of the leads its shards still hold, so a lead id published again is
/// charged (and a chat-only one held, then captured when the client replies), and a
/// repeat of a response to a lead still held charges nothing.
#[test]
fn r1_r9_a_start_from_an_older_snapshot_forgets_the_op_ids_of_leads_already_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    let start = || {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        Engine::start_with_fs(config(dir.path(), "zaask.toml", "zaask"), handle).expect("starts").0
    };
    let price = |out: OkResult| serde_json::to_value(out).unwrap()["price"].as_u64().expect("a price");
    in_system(async {
        let e = start();
        zaask_pro(&e, "p1").await;
        // L2 is still held by its shard, responded to.
        ok(&e, publish("L2", "lisboa", true, T0)).await;
        ok(&e, offer("L2", "p1", "respond")).await;
        // What an older release left of leads it had forgotten: L1 charged and
        // refunded, chat-only L3 held and released.
        let p = ProId::new("p1");
        let (l1, l3) = (LeadId::new("L1"), LeadId::new("L3"));
        let charge = OpId::for_lead("charge", &l1, &p);
        e.inner.ledger.charge(charge.clone(), &acme(), &p, 40).unwrap();
        e.inner
            .ledger
            .refund(OpId::for_lead("refund", &l1, &p), &acme(), &p, &charge, RefundReason::NotViewed)
            .unwrap();
        let hold = OpId::for_lead("hold", &l3, &p);
        e.inner.ledger.hold(hold.clone(), &acme(), &p, 30).unwrap();
        e.inner.ledger.release(OpId::for_lead("release", &l3, &p), &acme(), &p, &hold).unwrap();
        e.snapshot_as_before_lead_ops_forgotten().expect("snapshot");
    });
    in_system(async {
        let e = start();
        let captured = balance(&e, "p1").captured;
        ok(&e, offer("L2", "p1", "respond")).await;
        assert_eq!(balance(&e, "p1").captured, captured, "L2's ops kept: a repeat charges nothing");
        let l1 = price(ok(&e, publish("L1", "lisboa", true, T0 + 1)).await);
        ok(&e, offer("L1", "p1", "respond")).await;
        assert_eq!(balance(&e, "p1").captured, captured + l1, "L1 published again is charged");
        ok(&e, json!({"type": "grant_credits", "pro": "p1", "op": "pay-2", "credits": 100})).await;
        let l3 = price(ok(&e, publish("L3", "lisboa", false, T0 + 2)).await);
        ok(&e, offer("L3", "p1", "respond")).await;
        assert_eq!(balance(&e, "p1").held, l3, "chat-only L3 published again is held");
        ok(&e, offer("L3", "p1", "client_replied")).await;
        let b = balance(&e, "p1");
        assert_eq!((b.held, b.captured), (0, captured + l1 + l3), "and captured when the client replies");
        e.inner.ledger.check_invariants().expect("ledger invariants");
    });
}

/// R1: a lead id the lead index names in another shard that does not hold it (a
/// snapshot copies the index after its cut; a power cut can lose the record that added
/// the entry) does not refuse the id for ever: the entry is checked against its shard
/// and dropped. An id its shard does hold is still refused in another zone.
#[test]
fn r1_a_stale_lead_index_entry_does_not_refuse_the_id_in_another_zone() {
    with_engine("zaask.toml", "zaask", |e| async move {
        zaask_pro(&e, "p1").await;
        let porto = rota::ids::ShardKey {
            tenant: acme(),
            zone: rota::ids::ZoneId::new("porto"),
            category: rota::ids::CategoryId::new("painting"),
        };
        // What a snapshot read after its cut leaves when the lead's record is lost.
        e.lead_index().insert(&porto, &LeadId::new("L1"));
        ok(&e, publish("L1", "lisboa", true, T0)).await;
        // Held by lisboa now: refused in porto.
        let err = send(&e, publish("L1", "porto", true, T0)).await.expect_err("a different payload under L1");
        assert_eq!(err.code, "idempotency_conflict", "{err:?}");
    });
}

/// R1 across a restart: the lead index is what the recovered shards hold, not a copy
/// kept in the snapshot (one copied after its cut could name a shard that does not
/// hold the lead, when a power cut lost records on both sides of the cut). Here the
/// snapshot is taken with an entry naming the wrong zone, as such a copy would: after
/// the restart the lead is found where it is, and its id is refused in the other zone.
#[test]
fn r1_after_a_restart_each_lead_id_names_the_shard_that_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    let start = || {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        Engine::start_with_fs(config(dir.path(), "zaask.toml", "zaask"), handle).expect("starts").0
    };
    let key = |zone: &str| rota::ids::ShardKey {
        tenant: acme(),
        zone: rota::ids::ZoneId::new(zone),
        category: rota::ids::CategoryId::new("painting"),
    };
    let l1 = LeadId::new("L1");
    in_system(async {
        let e = start();
        zaask_pro(&e, "p1").await;
        ok(&e, publish("L1", "lisboa", true, T0)).await;
        e.lead_index().insert(&key("porto"), &l1);
        e.snapshot().expect("snapshot");
    });
    in_system(async {
        let e = start();
        assert_eq!(e.lead_index().shard_of(&acme(), &l1), Some(key("lisboa")));
        ok(&e, json!({"type": "explain", "lead": "L1"})).await;
        let err = send(&e, publish("L1", "porto", true, T0)).await.expect_err("held in lisboa");
        assert_eq!(err.code, "idempotency_conflict", "{err:?}");
    });
}

/// R10/R20/R24 over a long life: a pro's payment ids and its budget's weekly
/// recharges are not remembered for ever (the newest 256 grants, 64 recharges), a pause
/// that ended long ago is never resumed again (one recharge a week, for 70 weeks, past
/// the point where its resume's id is forgotten), and a restart, from the log alone or
/// from a snapshot, rebuilds the same ledger, forgotten ids included.
#[test]
fn r10_r20_r24_payment_and_recharge_ids_stay_bounded_over_years_and_survive_a_restart() {
    const WEEK: i64 = 7 * DAY;
    let grant =
        |i: usize| json!({"type": "grant_credits", "pro": "b1", "op": format!("pay-{i}"), "credits": 1});
    for snapshot in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let fs = MemFs::new();
        let start = || {
            let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
            let cfg = config(dir.path(), "habitissimo.toml", "habitissimo");
            Engine::start_with_fs(cfg, handle).expect("starts").0
        };
        let ran = in_system(async {
            let e = start();
            // A config sent with a pause that is already over (R24).
            ok(&e, buyer("b1", Some(T0 - DAY))).await;
            let first = budget(&e, "b1").period;
            for i in 0..300 {
                ok(&e, grant(i)).await;
            }
            for w in 1..=70 {
                ok(&e, json!({"type": "advance_clock", "to_ms": T0 + w * WEEK})).await;
                let b = budget(&e, "b1");
                assert_eq!(b.period, first + w as u64, "week {w}: one recharge a week (R20), {b:?}");
                if snapshot && w == 40 {
                    e.snapshot().expect("snapshot");
                }
            }
            for i in 300..320 {
                ok(&e, grant(i)).await;
            }
            assert_eq!(balance(&e, "b1").granted, 320);
            assert!(
                e.inner.ledger.registered_ops() <= 256 + 8 + 64,
                "{} op ids remembered",
                e.inner.ledger.registered_ops()
            );
            e.inner.ledger.snapshot()
        });
        let recovered = in_system(async {
            let e = start();
            let rebuilt = e.inner.ledger.snapshot();
            // A retry of a recent payment is answered, not credited again.
            ok(&e, grant(319)).await;
            ok(&e, grant(100)).await;
            assert_eq!(balance(&e, "b1").granted, 320, "recent payments are remembered after a restart");
            rebuilt
        });
        assert!(ran == recovered, "the recovered ledger differs (snapshot: {snapshot})");
    }
}
