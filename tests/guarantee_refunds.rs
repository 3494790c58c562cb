//! R12 guarantee refunds through the whole engine (in-process, manual clock, in-memory
//! filesystem): a charge keeps the guarantee it was made under when a reload or a
//! restart shortens the window, and an auto-buy purchase is guaranteed like a paid
//! response, from the moment it is bought.

mod engine_support;

use engine_support::{acme, acme_config as config, in_system, ok, T0};
use rota::config::Config;
use rota::engine::Engine;
use rota::ids::ProId;
use rota::ledger::BudgetName;
use rota::wal::MemFs;
use serde_json::{json, Value};
use std::sync::Arc;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// The zaask policy with a guarantee of `days`.
fn zaask(dir: &std::path::Path, days: i64) -> Config {
    config(dir, "zaask.toml", "zaask", &[("guarantee_window_s", &(days * DAY / 1000).to_string())])
}

async fn advance(e: &Engine, to: i64) {
    ok(e, json!({"type": "advance_clock", "to_ms": to})).await;
}

fn lead(id: &str, zone: &str, at: i64) -> Value {
    json!({"type": "publish_lead", "lead": {
        "id": id, "category": "painting", "zone": zone,
        "description": format!("Repaint a two-room flat, walls and ceilings ({id})"),
        "details": {"rooms": "2"},
        "client": {"id": format!("client-{id}"), "name": "Ana Garcia", "phone": "+351 910 000 000",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "created_at": at
    }})
}

/// Pro `p1` in Lisbon painting (zaask) with plenty of credits.
async fn zaask_pro(e: &Engine) {
    ok(
        e,
        json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"], "zones": ["lisboa"]}}),
    )
    .await;
    ok(e, json!({"type": "grant_credits", "pro": "p1", "op": "g1", "credits": 10_000})).await;
}

fn p1(e: &Engine) -> rota::ledger::Balance {
    e.inner.ledger.balance(&acme(), &ProId::new("p1"))
}

/// R12 (and the reload docs: "what earlier decisions set (... guarantee windows ...)
/// stays as it was decided"): a response charged under a 30-day guarantee is refunded
/// at day 30 if never viewed, though a reload shortened the guarantee to one day before
/// the lead closed (day 2) and the lead's id retention (7 days) ends long before.
#[test]
fn r12_a_response_keeps_its_30_day_guarantee_when_a_reload_shortens_the_window_before_the_close() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(zaask(dir.path(), 30), handle).expect("starts");
        zaask_pro(&e).await;
        ok(&e, lead("L1", "lisboa", T0)).await;
        ok(&e, json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "respond"})).await;
        let charged = p1(&e).captured;
        assert!(charged > 0, "the response was charged");
        e.reload(&zaask(dir.path(), 1)).expect("reloaded");
        // The lead closes at day 2 (48 h lifetime); the shard ticks as time passes.
        for day in [3, 10, 20] {
            advance(&e, T0 + day * DAY).await;
        }
        assert_eq!(p1(&e).refunded, 0, "within the 30-day guarantee");
        advance(&e, T0 + 31 * DAY).await;
        assert_eq!(p1(&e).refunded, charged, "never viewed in the 30 days it was charged under: refunded");
    });
}

/// R12 across restarts: the guarantee is shortened while rota is stopped, the lead then
/// closes under the short window, and rota restarts again (the close is replayed from
/// the log under the policy logged with it). Recovery rebuilds the shard that ran (the
/// lead remembered until its guarantee), and the refund comes at day 30.
#[test]
fn r12_a_response_keeps_its_30_day_guarantee_across_restarts_that_shorten_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    let start = |cfg: Config| {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        Engine::start_with_fs(cfg, handle).expect("starts").0
    };
    let charged = in_system(async {
        let e = start(zaask(dir.path(), 30));
        zaask_pro(&e).await;
        ok(&e, lead("L1", "lisboa", T0)).await;
        ok(&e, json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "respond"})).await;
        p1(&e).captured
    });
    assert!(charged > 0, "the response was charged");
    // Restarted with a one-day guarantee; the lead closes under it.
    let ran = in_system(async {
        let e = start(zaask(dir.path(), 1));
        advance(&e, T0 + 3 * DAY).await;
        e.shard_states()
    });
    // Abandoned without a stop: the close is replayed from the log.
    in_system(async {
        let e = start(zaask(dir.path(), 1));
        let recovered = e.shard_states();
        assert_eq!(ran.len(), recovered.len());
        for ((k, a), (_, b)) in ran.iter().zip(&recovered) {
            assert!(a == b, "shard {k:?} differs after recovery");
        }
        for day in [10, 20] {
            advance(&e, T0 + day * DAY).await;
        }
        assert_eq!(p1(&e).refunded, 0, "within the 30-day guarantee");
        advance(&e, T0 + 31 * DAY).await;
        assert_eq!(p1(&e).refunded, charged, "never viewed in the 30 days it was charged under: refunded");
    });
}

/// Runs `f` on a fresh engine for tenant `acme` on the habitissimo policy with a
/// one-day guarantee.
fn with_habitissimo<F, Fut>(f: F)
where
    F: FnOnce(Engine) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    with_habitissimo_guarantee("86400", f)
}

/// [`with_habitissimo`] with a guarantee of `window_s` seconds.
fn with_habitissimo_guarantee<F, Fut>(window_s: &str, f: F)
where
    F: FnOnce(Engine) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "habitissimo.toml", "habitissimo", &[("guarantee_window_s", window_s)]);
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(cfg, handle).expect("engine starts");
        f(e).await;
    });
}

/// Buyer `b1` in Madrid painting with a weekly budget of 24 (two leads at 12).
async fn buyer(e: &Engine) {
    ok(
        e,
        json!({"type": "upsert_pro", "pro": {"id": "b1", "categories": ["painting"], "zones": ["madrid"],
        "autobuy": [{"name": "main", "zones": ["madrid"], "categories": ["painting"],
                     "weekly_budget_credits": 24}]}}),
    )
    .await;
}

fn main_budget(e: &Engine) -> rota::ledger::BudgetBalance {
    e.inner.ledger.budget(&acme(), &ProId::new("b1"), &BudgetName::new("main")).expect("budget set")
}

/// R12 (habitissimo: "a bought contact the client never views ... is refunded
/// automatically"): an auto-buy purchase, charged at dispatch, whose proposal is never
/// viewed within the guarantee window is refunded to the budget it was spent from.
#[test]
fn r12_an_auto_buy_purchase_never_viewed_is_refunded_to_its_budget() {
    with_habitissimo(|e| async move {
        buyer(&e).await;
        ok(&e, lead("A1", "madrid", T0)).await;
        assert_eq!(main_budget(&e).available, 12, "bought at 12");
        ok(&e, json!({"type": "offer", "lead": "A1", "pro": "b1", "action": "respond"})).await;
        // Wednesday: same week, guarantee (1 day) long over, never viewed.
        advance(&e, T0 + 2 * DAY).await;
        let b = main_budget(&e);
        assert_eq!(b.period, 1, "no recharge in between");
        assert_eq!((b.available, b.refunded), (24, 12), "never viewed: refunded");
    });
}

/// R12: a bought contact whose proposal the client viewed within the window keeps its
/// charge.
#[test]
fn r12_an_auto_buy_purchase_viewed_within_the_window_is_not_refunded() {
    with_habitissimo(|e| async move {
        buyer(&e).await;
        ok(&e, lead("A1", "madrid", T0)).await;
        ok(&e, json!({"type": "offer", "lead": "A1", "pro": "b1", "action": "respond"})).await;
        advance(&e, T0 + 12 * HOUR).await;
        ok(&e, json!({"type": "offer", "lead": "A1", "pro": "b1", "action": "client_viewed"})).await;
        advance(&e, T0 + 2 * DAY).await;
        let b = main_budget(&e);
        assert_eq!((b.available, b.refunded), (12, 0), "viewed: the purchase stands");
    });
}

/// R12 for auto-buy: the guarantee runs from the purchase (the charge), not from the
/// buyer's later answer: bought at T0 and answered 20 hours later, never viewed, the
/// spend is back one day after the purchase.
#[test]
fn r12_an_auto_buy_guarantee_runs_from_the_purchase_not_from_the_answer() {
    with_habitissimo(|e| async move {
        buyer(&e).await;
        ok(&e, lead("A1", "madrid", T0)).await;
        advance(&e, T0 + 20 * HOUR).await;
        ok(&e, json!({"type": "offer", "lead": "A1", "pro": "b1", "action": "respond"})).await;
        advance(&e, T0 + DAY - 1).await;
        assert_eq!(main_budget(&e).refunded, 0, "within the day after the purchase");
        advance(&e, T0 + DAY).await;
        assert_eq!(main_budget(&e).refunded, 12, "one day after the purchase, never viewed: refunded");
    });
}

/// R12 with R20: the shipped habitissimo guarantee is a week, so a purchase never
/// viewed is always refunded after a Monday recharge. The refund is credited to the
/// week it happens in (one more lead can be bought), not recorded against the week
/// that is over while giving nothing back.
#[test]
fn r12_r20_a_week_long_guarantee_refund_after_the_monday_recharge_gives_the_budget_back() {
    with_habitissimo_guarantee("604800", |e| async move {
        buyer(&e).await;
        ok(&e, lead("A1", "madrid", T0)).await;
        ok(&e, json!({"type": "offer", "lead": "A1", "pro": "b1", "action": "respond"})).await;
        assert_eq!(main_budget(&e).available, 12, "bought at 12");
        advance(&e, T0 + 7 * DAY).await;
        let b = main_budget(&e);
        assert_eq!(b.period, 2, "a Monday recharge came first");
        assert_eq!((b.available, b.refunded), (24 + 12, 12), "refunded into this week");
        // Three leads at 12 this week: the refund buys one more.
        for (i, id) in ["B1", "B2", "B3"].into_iter().enumerate() {
            let at = T0 + 7 * DAY + (i as i64 + 1) * HOUR;
            advance(&e, at).await;
            ok(&e, lead(id, "madrid", at)).await;
        }
        assert_eq!(main_budget(&e).available, 0, "three bought");
        e.inner.ledger.check_invariants().unwrap();
    });
}

/// R12 (zaask: "the client views your proposal"): a client who replied to the
/// proposal has seen it, so the guarantee is kept and nothing is refunded, though the
/// platform never sent `client_viewed`. A response nobody answered or viewed is
/// refunded at the same moment (the control).
#[test]
fn r12_a_client_reply_counts_as_a_view_and_keeps_the_charge() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let (e, _) = Engine::start_with_fs(zaask(dir.path(), 7), handle).expect("starts");
        zaask_pro(&e).await;
        ok(&e, lead("L1", "lisboa", T0)).await;
        ok(&e, lead("L2", "lisboa", T0 + 1)).await;
        for l in ["L1", "L2"] {
            ok(&e, json!({"type": "offer", "lead": l, "pro": "p1", "action": "respond"})).await;
        }
        let each = p1(&e).captured / 2;
        assert!(each > 0, "both responses were charged");
        advance(&e, T0 + HOUR).await;
        ok(&e, json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "client_replied"})).await;
        advance(&e, T0 + 8 * DAY).await;
        assert_eq!(p1(&e).refunded, each, "only the response the client never answered nor viewed");
    });
}

/// R12: the guarantee promises a refund if the client does not view the proposal
/// within the window; a view recorded after it (sent late by the platform, or before
/// the shard's timer got to the deadline) does not take that refund away, whether the
/// timer fired first or not. The refund is made once.
#[test]
fn r12_a_view_after_the_guarantee_window_does_not_cancel_the_refund() {
    let dir = tempfile::tempdir().unwrap();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(MemFs::new().process_handle());
        let (e, _) = Engine::start_with_fs(zaask(dir.path(), 7), handle).expect("starts");
        zaask_pro(&e).await;
        ok(&e, lead("L1", "lisboa", T0)).await;
        ok(&e, json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "respond"})).await;
        let charged = p1(&e).captured;
        assert!(charged > 0, "the response was charged");
        // Five seconds past the window, before any tick handled its deadline.
        e.inner.clock.advance_to(T0 + 7 * DAY + 5_000).expect("the manual clock");
        ok(&e, json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "client_viewed"})).await;
        assert_eq!(p1(&e).refunded, charged, "not viewed within the window: refunded");
        advance(&e, T0 + 8 * DAY).await;
        assert_eq!(p1(&e).refunded, charged, "once");
    });
}

/// R9/R12: on a chat-only lead the response is held and captured when the client
/// replies; a reply that comes after the guarantee window (the lead still open) is the
/// first sign the client saw the proposal, too late: captured and refunded at once,
/// as a view after the window is for a charge already taken.
#[test]
fn r9_r12_a_chat_only_reply_after_the_guarantee_window_is_captured_and_refunded() {
    let dir = tempfile::tempdir().unwrap();
    in_system(async {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(MemFs::new().process_handle());
        let (e, _) = Engine::start_with_fs(zaask(dir.path(), 1), handle).expect("starts");
        zaask_pro(&e).await;
        let mut chat_only = lead("L1", "lisboa", T0);
        chat_only["lead"]["client"]["contact"] = json!({"call": false, "chat": true});
        ok(&e, chat_only).await;
        ok(&e, json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "respond"})).await;
        let held = p1(&e).held;
        assert!(held > 0, "held at the response");
        // A day and five seconds on: the window is over, the lead (48 h) still open.
        e.inner.clock.advance_to(T0 + DAY + 5_000).expect("the manual clock");
        ok(&e, json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "client_replied"})).await;
        let b = p1(&e);
        assert_eq!((b.held, b.captured, b.refunded), (0, held, held), "captured, then refunded: {b:?}");
        advance(&e, T0 + 3 * DAY).await;
        assert_eq!(p1(&e).refunded, held, "once");
    });
}
