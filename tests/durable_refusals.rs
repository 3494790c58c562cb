//! A refusal is decided on the state in memory, which may hold records not yet
//! durable: it is answered only once they are, and if they never become durable (the
//! disk fails, the power goes), the answer is `unavailable` (in doubt), not a final
//! refusal that a restart would contradict.

mod engine_support;

use engine_support::{acme_config, send};
use rota::config::{Config, Sources};
use rota::engine::Engine;
use rota::ids::LeadId;
use rota::wal::{Fault, MemFs};
use serde_json::json;

/// zaask with one responder per lead, and the log's syncs held back 100 ms (so that a
/// second request is decided while the first one's record waits for its sync).
fn config(dir: &std::path::Path) -> Config {
    acme_config(dir, "zaask.toml", "zaask", &[("max_responders", "1")]);
    let path = dir.join("rota.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("fsync = \"always\"\n", "fsync = \"always\"\nmin_sync_interval_us = 100000\n");
    std::fs::write(&path, text).unwrap();
    Config::load(&Sources { file: Some(path), ..Default::default() }).unwrap()
}

/// Runs `body` on an engine started on a fresh in-memory disk ([`config`]), with that
/// disk (to hold its syncs or inject faults into).
fn on_engine<Fut: std::future::Future<Output = ()>>(body: impl FnOnce(Engine, MemFs) -> Fut) {
    let dir = tempfile::tempdir().unwrap();
    engine_support::on_engine_with(config(dir.path()), body);
}

/// Pro `p` in lisboa with 100 credits.
async fn pro_with_credits(e: &Engine, p: &str) {
    send(e, json!({"type": "upsert_pro", "pro": {"id": p, "categories": ["painting"], "zones": ["lisboa"]}}))
        .await
        .unwrap();
    send(e, json!({"type": "grant_credits", "pro": p, "op": format!("pay-{p}"), "credits": 100}))
        .await
        .unwrap();
}

/// Lead L1 in lisboa.
async fn publish_l1(e: &Engine) {
    send(
        e,
        json!({"type": "publish_lead", "lead": {
        "id": "L1", "category": "painting", "zone": "lisboa",
        "description": "Repaint a two-room flat, walls and ceilings, next week",
        "details": {"rooms": "2"},
        "client": {"id": "c1", "name": "Ana Garcia", "phone": "+351 910 000 000",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "created_at": engine_support::T0}}),
    )
    .await
    .unwrap();
}

/// R6: P2's response refused `lead_full` because of P1's response, whose record the
/// disk then fails to make durable: P2 is told `unavailable`, not `lead_full` (after a
/// restart the seat is free).
#[test]
fn r6_a_refusal_that_relied_on_a_record_the_disk_lost_is_answered_unavailable() {
    on_engine(|e, fs| async move {
        for p in ["p1", "p2"] {
            pro_with_credits(&e, p).await;
        }
        publish_l1(&e).await;
        fs.inject(Fault::SyncError);
        let respond =
            |p: &str| send(&e, json!({"type": "offer", "lead": "L1", "pro": p, "action": "respond"}));
        let (first, second) = futures_util::future::join(respond("p1"), respond("p2")).await;
        assert_eq!(first.unwrap_err().code, "unavailable", "its record was never durable");
        let second = second.unwrap_err();
        assert_eq!(second.code, "unavailable", "decided on p1's lost response: {second:?}");
    });
}

/// R9/R28: reads answer from memory only once what they saw is durable. A balance read
/// while a grant's record waits for its sync, and an `explain` while a response's
/// record does, are answered `unavailable` when the disk then fails that sync: they
/// would have shown credits and a response a restart takes away.
#[test]
fn r9_r28_reads_that_saw_a_record_the_disk_lost_are_answered_unavailable() {
    for read in ["balance", "explain", "search"] {
        on_engine(|e, fs| async move {
            pro_with_credits(&e, "p1").await;
            publish_l1(&e).await;
            // Durable so far: the reads answer.
            let query = match read {
                "balance" => json!({"type": "balance", "pro": "p1"}),
                "explain" => json!({"type": "explain", "lead": "L1"}),
                _ => json!({"type": "search", "pro": "p1", "query": "flat"}),
            };
            send(&e, query.clone()).await.expect("a read of durable state answers");
            fs.inject(Fault::SyncError);
            let change = match read {
                "balance" => json!({"type": "grant_credits", "pro": "p1", "op": "pay-2", "credits": 50}),
                _ => json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "respond"}),
            };
            let (changed, seen) = futures_util::future::join(send(&e, change), send(&e, query)).await;
            assert_eq!(changed.unwrap_err().code, "unavailable", "its record was never durable");
            let seen = seen.expect_err(&format!("{read} saw the lost record"));
            assert_eq!(seen.code, "unavailable", "{read}: {seen:?}");
        });
    }
}

/// R26/R27: an order command refused on the book in memory (completing an order a
/// cancel still on its way to the disk ended) is answered `unavailable` when the disk
/// then fails that cancel's sync, not `illegal_transition`: after a restart the order
/// is active and can be completed.
#[test]
fn r26_r27_an_order_refusal_that_relied_on_a_record_the_disk_lost_is_answered_unavailable() {
    on_engine(|e, fs| async move {
        let order = |command: serde_json::Value| send(&e, json!({"type": "order", "command": command}));
        order(json!({"type": "set_acceptance_mode", "pro": "s1", "service": "logo", "mode": {"mode": "auto_accept"}}))
            .await
            .unwrap();
        order(json!({"type": "place_order", "order": "o1",
            "placement": {"pro": "s1", "client": "k1", "service": "logo", "package": "basic"}}))
        .await
        .unwrap();
        fs.inject(Fault::SyncError);
        let (cancel, complete) = futures_util::future::join(
            order(json!({"type": "cancel_order", "order": "o1"})),
            order(json!({"type": "complete_order", "order": "o1"})),
        )
        .await;
        assert_eq!(cancel.unwrap_err().code, "unavailable", "its record was never durable");
        let complete = complete.unwrap_err();
        assert_eq!(complete.code, "unavailable", "decided on the lost cancel: {complete:?}");
    });
}

/// R1/R9: an `offer` on a lead whose forgetting (retention over) is still on its way to
/// the disk is answered `unavailable` when the disk then fails that record's sync, not
/// `unknown_lead`: after a restart the lead is remembered again, and the same action
/// gets the lead's own answer.
#[test]
fn r1_r9_unknown_lead_from_a_forgetting_the_disk_lost_is_answered_unavailable() {
    on_engine(|e, fs| async move {
        pro_with_credits(&e, "p1").await;
        publish_l1(&e).await;
        let clock = |to: i64| send(&e, json!({"type": "advance_clock", "to_ms": to}));
        const DAY: i64 = 24 * 3_600_000;
        clock(engine_support::T0 + 3 * DAY).await.expect("the lead closes");
        fs.inject(Fault::SyncError);
        let hold = fs.hold_syncs();
        let (tick, offer) = futures_util::future::join(clock(engine_support::T0 + 10 * DAY), async {
            // Once the tick has forgotten the lead in memory (its record written, its
            // sync held), the offer is sent; then the sync goes ahead, and fails.
            let forgotten = || e.lead_index().shard_of(&engine_support::acme(), &LeadId::new("L1")).is_none();
            while !forgotten() {
                tokio::task::yield_now().await;
            }
            let offer = send(
                &e,
                json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "decline", "by": "pro"}),
            );
            let mut offer = std::pin::pin!(offer);
            let first = futures_util::poll!(offer.as_mut());
            drop(hold);
            match first {
                std::task::Poll::Ready(answer) => answer,
                std::task::Poll::Pending => offer.await,
            }
        })
        .await;
        assert_eq!(tick.unwrap_err().code, "unavailable", "the forgetting was never durable");
        let offer = offer.unwrap_err();
        assert_eq!(offer.code, "unavailable", "decided on the lost forgetting: {offer:?}");
    });
}

/// R9: reads wait for durability through one closing of the gate for all of those
/// waiting (taken on a thread of its own, so a flood of reads neither stops every
/// decision once per read nor blocks a worker): 500 `balance` reads sent while a
/// grant's sync is held share at most two, and each is answered (the grant, closing
/// the gate on the same thread, may take one more of its own).
#[test]
fn r9_reads_waiting_together_share_one_closing_of_the_gate() {
    on_engine(|e, fs| async move {
        pro_with_credits(&e, "p1").await;
        let before = e.read_barriers();
        let hold = fs.hold_syncs();
        // A grant whose record waits for the held sync, then the reads.
        let grant = send(&e, json!({"type": "grant_credits", "pro": "p1", "op": "pay-2", "credits": 5}));
        let reads = (0..500).map(|_| send(&e, json!({"type": "balance", "pro": "p1"})));
        let mut all =
            std::pin::pin!(futures_util::future::join(grant, futures_util::future::join_all(reads)));
        assert!(futures_util::poll!(all.as_mut()).is_pending(), "the sync is held");
        drop(hold);
        let (granted, answers) = all.await;
        granted.expect("granted");
        assert!(answers.iter().all(Result::is_ok), "{:?}", answers.iter().find(|a| a.is_err()));
        let taken = e.read_barriers() - before;
        assert!((1..=3).contains(&taken), "{taken} closings of the gate for 500 reads and a grant");
    });
}
