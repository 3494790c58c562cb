//! A decision logged as several WAL records (a tick after a pause, a release to
//! thousands of pros: `engine::actor::split_record`) is replayed whole or not at all.
//!
//! A tick's first record sweeps every due deadline (`Ticked`) while the events that
//! handle them may be in its later records; replaying a cut-off prefix lost those
//! deadlines for good: leads never released nor closed, their holds never released
//! (R5, R9). The records of one decision share a group id (`record::Part`), and
//! replay holds them back until the last.

mod engine_support;

use engine_support::{acme_config, in_system};
use rota::engine::record::{self, Part, WalRecord, RECORD_KIND};
use rota::engine::Engine;
use rota::ids::{CategoryId, ProId, ShardKey, TenantId, ZoneId};
use rota::ledger::{CreditFact, LedgerEvent, OpId};
use rota::wal::MemFs;
use std::sync::Arc;

fn key(zone: &str) -> ShardKey {
    ShardKey { tenant: TenantId::new("acme"), zone: ZoneId::new(zone), category: CategoryId::new("painting") }
}

/// A shard record moving only money (a grant is the easiest fact to observe), as
/// part `part` of a decision.
fn record(zone: &str, op: &str, pro: &str, amount: u64, part: Option<(u64, bool)>) -> (u8, Vec<u8>) {
    let money = vec![LedgerEvent::Credit {
        op: OpId::new(op),
        tenant: TenantId::new("acme"),
        pro: ProId::new(pro),
        fact: CreditFact::Granted { amount },
    }];
    let part = part.map(|(group, last)| Part { group, last });
    (RECORD_KIND, record::encode(&WalRecord::Shard { key: key(zone), events: Vec::new(), money, part }))
}

#[test]
fn r5_r9_a_split_decision_cut_off_before_its_last_record_is_not_replayed_and_a_whole_one_is() {
    let dir = tempfile::tempdir().unwrap();
    let fs = MemFs::new();
    let start = || {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let cfg = acme_config(dir.path(), "zaask.toml", "zaask", &[]);
        Engine::start_with_fs(cfg, handle).expect("starts").0
    };
    in_system(async {
        let e = start();
        // p1: a decision in two records, another shard's records between them.
        // p2: a decision cut off, then the same shard's next decision (one record).
        // p3: a decision cut off at the end of the log.
        let log = vec![
            record("lisboa", "a1", "p1", 100, Some((11, false))),
            record("porto", "c1", "p2", 7, Some((12, false))),
            record("porto", "d1", "p2", 1, None),
            record("lisboa", "a2", "p1", 10, Some((11, true))),
            record("braga", "e1", "p3", 5, Some((13, false))),
        ];
        for r in log {
            e.inner.wal.append_blocking(vec![r]).expect("appended");
        }
    });
    in_system(async {
        let e = start();
        let balance = |p: &str| e.inner.ledger.balance(&TenantId::new("acme"), &ProId::new(p)).granted;
        assert_eq!(balance("p1"), 110, "a whole decision is replayed, every record of it");
        assert_eq!(balance("p2"), 1, "a decision cut off before its last record is not");
        assert_eq!(balance("p3"), 0, "nor one cut off at the end of the log");
        e.inner.ledger.check_invariants().expect("ledger invariants");
    });
}

#[test]
fn records_written_before_decisions_had_parts_are_replayed_as_they_come() {
    // A record without `part` (every record of an earlier release) is its own
    // decision: nothing is held back.
    let bytes = record::encode(&WalRecord::Shard {
        key: key("lisboa"),
        events: Vec::new(),
        money: Vec::new(),
        part: None,
    });
    let decoded = record::decode(&bytes).expect("decodes");
    assert!(matches!(decoded, WalRecord::Shard { part: None, .. }));
    // A record of the earlier layout (three fields) still decodes, without a part.
    #[derive(serde::Serialize)]
    enum Old {
        Shard { key: ShardKey, events: Vec<()>, money: Vec<()> },
    }
    let old = rmp_serde::to_vec(&Old::Shard { key: key("lisboa"), events: vec![], money: vec![] }).unwrap();
    assert!(
        matches!(record::decode(&old), Ok(WalRecord::Shard { part: None, .. })),
        "{:?}",
        record::decode(&old)
    );
}

/// The events the stream gave out after a tick, from seq `after` on (in memory).
fn published_after(e: &Engine, after: u64) -> Vec<(u64, rota::protocol::StreamEvent)> {
    let hub = e.hub(&TenantId::new("acme")).expect("tenant acme");
    let s = hub
        .subscribe(Some(after), None, 16, rota::protocol::Encoding::Msgpack)
        .unwrap_or_else(|e| panic!("resume after {after}: {e:?}"));
    hub.cancel(&s);
    s.backlog.iter().map(|o| (o.seq, o.event.clone())).collect()
}

/// R5/R9 with the stream: a subscriber is told only what is durable. A tick closing
/// thousands of leads is logged in several records; their stream events go out once
/// every record of it is durable, and a power cut at any disk operation of the tick
/// leaves every event a subscriber got in the stream after the restart, at the same
/// seq. (Each record used to be appended, synced and published on its own: a cut
/// before the last record's sync took back events already sent.)
#[test]
fn r5_r9_a_power_cut_in_a_split_tick_never_takes_back_events_the_stream_gave_out() {
    const LEADS: usize = 4_200;
    let dir = tempfile::tempdir().unwrap();
    let base = MemFs::new();
    let start = |fs: &MemFs| {
        let handle: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let cfg = acme_config(dir.path(), "zaask.toml", "zaask", &[]);
        Engine::start_with_fs(cfg, handle).expect("starts").0
    };
    let ask = |e: &Engine, v: serde_json::Value| {
        let e = e.clone();
        async move { e.request(&TenantId::new("acme"), engine_support::req(v)).await }
    };
    // Leads that all close at the same moment (48 h after publishing).
    in_system(async {
        let e = start(&base);
        // Pipelined, as a gateway would (one group commit for many), within the
        // shard's mailbox.
        for chunk in (0..LEADS).collect::<Vec<_>>().chunks(256) {
            let publishes = chunk.iter().map(|&i| {
            ask(
                &e,
                serde_json::json!({"type": "publish_lead", "lead": {
                    "id": format!("L{i}"), "category": "painting", "zone": "lisboa",
                    "description": "Repaint a two-room flat, walls and ceilings", "details": {"rooms": "2"},
                    "client": {"id": format!("c{i}"), "name": "Ana", "phone": "+351 910 000 000",
                               "phone_verified": true, "contact": {"call": true}},
                    "created_at": engine_support::T0
                }}),
            )
        });
            for outcome in futures_util::future::join_all(publishes).await {
                let outcome = serde_json::to_value(outcome.expect("published")).unwrap();
                assert_eq!(outcome["status"], "accepted", "{outcome}");
            }
        }
        e.shutdown().await.expect("clean stop");
    });
    let close = serde_json::json!({"type": "advance_clock", "to_ms": engine_support::T0 + 49 * 3_600_000});
    let mut cuts = 0;
    for k in 1..=12 {
        let fs = base.deep_clone();
        let (before, published) = in_system(async {
            let e = start(&fs);
            let hub = e.hub(&TenantId::new("acme")).unwrap();
            let before =
                hub.subscribe(None, None, 16, rota::protocol::Encoding::Msgpack).unwrap().next_seq - 1;
            fs.cut_power_after(k);
            let _ = ask(&e, close.clone()).await;
            (before, published_after(&e, before))
        });
        if fs.power_cuts() == 0 {
            // The tick needed fewer than k disk operations: all of it is out.
            assert!(published.len() >= LEADS, "every lead closed: {} events", published.len());
            break;
        }
        cuts += 1;
        in_system(async {
            let e = start(&fs);
            let after = published_after(&e, before);
            for (seq, ev) in &published {
                assert!(
                    after.iter().any(|(s, a)| s == seq && a == ev),
                    "cut at disk operation {k}: event {seq} was given out, and is gone after the restart"
                );
            }
        });
    }
    assert!(cuts >= 2, "the sweep cut the tick at least twice");
}
