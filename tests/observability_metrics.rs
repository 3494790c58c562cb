//! The global recorder as the daemon installs it, and the metrics dump that
//! `tests/observability/check.sh static` lints with `promtool check metrics`.
//!
//! Write the dump with:
//! `cargo test --test observability_metrics -- --ignored dump_metrics`
//! (to `$ROTA_METRICS_DUMP`, default `target/observability/metrics.prom`).

mod engine_support;

use engine_support::{acme_config, in_system, ok, send, T0};
use rota::core::shard::ExplainOutcome;
use rota::engine::Engine;
use rota::ids::TenantId;
use rota::protocol::OkResult;
use rota::telemetry::{self, Metrics, TenantMetrics, WalStatsLike, ALL};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::Duration;

/// Installs the global recorder once per test process and records every metric.
fn rendered() -> String {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    let handle = HANDLE.get_or_init(|| {
        let handle = telemetry::install().expect("the first install in this process succeeds");
        for tenant in ["acme", "globex"] {
            let t = TenantMetrics::new(tenant);
            t.leads_received.increment(100);
            t.leads_dispatched.increment(90);
            t.leads_rejected.get("insufficient_details").increment(10);
            t.offers_dispatched.get("generic").increment(300);
            t.offer_transitions.get("replied").increment(40);
            t.responses_refused.get("lead_full").increment(3);
            t.credits_moved.get("charged").increment(1200);
            t.topups_requested.increment(2);
            t.observe_fairness([(0.26, 0.25), (0.24, 0.25), (0.5, 0.5)]);
        }
        let m = Metrics::new();
        m.shards_alive.set(12.0);
        m.mailbox_depth_max.set(3.0);
        m.clock_behind.set(0.0);
        m.overload_refusals.get("mailbox_full").increment(1);
        m.connections.get("ingest").set(2.0);
        m.connections.get("stream").set(4.0);
        m.frames_received.get("msgpack").increment(1000);
        m.frames_sent.get("msgpack").increment(3000);
        m.auth_failures.get("invalid_token").increment(1);
        m.slow_subscriber_disconnects.increment(1);
        m.stream_resumes.get("replayed").increment(1);
        for i in 1..=100u32 {
            m.decide_duration.record(f64::from(i) * 1e-7);
            m.ingest_to_durable.record(f64::from(i) * 5e-6);
            m.ingest_to_delivery.record(f64::from(i) * 1e-5);
        }
        {
            use rota::wal::WalObserver;
            m.wal.batch(64);
            m.wal.synced(Duration::from_micros(250));
        }
        m.wal.observe(&WalStatsLike {
            bytes_written: 8192,
            records: 64,
            batches: 1,
            syncs: 1,
            segments_live: 1,
            durable_seq: 64,
            ..Default::default()
        });
        m.wal.snapshot_duration.record(Duration::from_millis(40));
        m.wal.snapshot_failures.increment(1);
        m.wal.record_recovery(Duration::from_millis(15), 20_000);
        telemetry::refresh_process_metrics();
        handle
    });
    handle.render()
}

#[test]
fn installed_recorder_renders_every_metric() {
    let text = rendered();
    for d in ALL {
        if d.name.starts_with("process_") && !cfg!(target_os = "linux") {
            continue;
        }
        let sample = text.lines().any(|l| {
            !l.starts_with('#')
                && l.starts_with(d.name)
                && matches!(l.as_bytes().get(d.name.len()), Some(b'{' | b' ' | b'_'))
        });
        assert!(sample, "no sample of {} (record it above when adding a metric)\n{text}", d.name);
    }
    assert!(text.contains("rota_build_info{"), "{text}");
    assert!(!text.contains("quantile="), "summaries must not be rendered");
}

#[test]
fn a_second_install_is_an_error_not_a_silent_second_recorder() {
    let _ = rendered();
    assert!(telemetry::install().is_err());
}

#[test]
#[ignore = "writes a file; run explicitly for check.sh static"]
fn dump_metrics() {
    let path = std::env::var("ROTA_METRICS_DUMP")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/observability/metrics.prom").into());
    let path = std::path::PathBuf::from(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&path, rendered()).unwrap();
    eprintln!("wrote {}", path.display());
}

/// Every `rota_*` / `process_*` token of `text`, with histogram suffixes removed.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for token in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !(token.starts_with("rota_") || token.starts_with("process_")) {
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| token.strip_suffix(s).filter(|b| telemetry::def(b).is_some()))
            .unwrap_or(token);
        out.push(base.to_string());
    }
    out
}

fn repo_file(path: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics_and_the_dashboard_shows_all() {
    let dashboard = repo_file("grafana/rota-dashboard.json");
    let alerts = repo_file("grafana/alerts.yml");
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        for name in metric_names(text) {
            assert!(telemetry::def(&name).is_some(), "{file} uses {name}, which rota does not export");
        }
    }
    let used = metric_names(&dashboard);
    for d in ALL {
        assert!(used.iter().any(|n| n == d.name), "no dashboard panel shows {}", d.name);
    }
}

#[test]
fn every_dashboard_panel_has_a_unit_and_queries() {
    let v: serde_json::Value = serde_json::from_str(&repo_file("grafana/rota-dashboard.json")).unwrap();
    let vars: Vec<&str> =
        v["templating"]["list"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(vars, ["datasource", "tenant"]);
    let panels = v["panels"].as_array().unwrap();
    let mut checked = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap();
        let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
        assert!(!unit.is_empty(), "panel {title:?} has no unit");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            if expr.contains("rate(") {
                assert!(
                    expr.contains("[$__rate_interval]"),
                    "panel {title:?}: rate over a fixed window: {expr}"
                );
            }
            let tenant_metric = ["leads_", "offer", "responses_", "credits_", "topups_", "fairness_"]
                .iter()
                .any(|m| expr.contains(&format!("rota_{m}")));
            if tenant_metric {
                assert!(expr.contains("tenant=~\"$tenant\""), "panel {title:?} ignores $tenant: {expr}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} panels");
}

// ---------------------------------------------------------------------------------
// Business counters from a real engine run
// ---------------------------------------------------------------------------------

const MIN: i64 = 60_000;

/// Runs `f` on a fresh in-process engine for tenant `acme` on the example policy
/// `file` (tenant `name`), its metrics on a recorder of its own, and returns what
/// that recorder renders afterwards.
fn metrics_of_run<F, Fut>(file: &str, name: &str, f: F) -> String
where
    F: FnOnce(Engine) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let cfg = acme_config(dir.path(), file, name, &[]);
    let recorder = telemetry::builder().build_recorder();
    let fs = rota::wal::MemFs::new();
    in_system(async {
        let handle: std::sync::Arc<dyn rota::wal::Fs> = std::sync::Arc::new(fs.process_handle());
        // The engine's handles are made at its start: on this recorder.
        let (e, _) = metrics::with_local_recorder(&recorder, || Engine::start_with_fs(cfg, handle))
            .expect("engine starts");
        f(e).await;
    });
    recorder.handle().render()
}

/// The value of the series `series` (`name{labels}`) in `text`; panics if absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn acme(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    match label {
        None => sample(text, &format!("{name}{{tenant=\"acme\"}}")),
        Some((k, v)) => sample(text, &format!("{name}{{tenant=\"acme\",{k}=\"{v}\"}}")),
    }
}

/// A painting lead in `zone`, created at `at`, for the pros `direct`.
fn lead(id: &str, zone: &str, direct: &[&str], at: i64) -> Value {
    json!({
        "id": id, "category": "painting", "zone": zone,
        "description": "Repaint a two-room flat, walls and ceilings, next week",
        "details": {"rooms": "2"},
        "client": {"id": format!("client-{id}"), "name": "Ana Garcia", "phone": "+39 333 000 0000",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "direct": direct,
        "created_at": at
    })
}

fn publish(l: Value) -> Value {
    json!({"type": "publish_lead", "lead": l})
}

/// Pro `id` in Bologna painting (prontopro: 10 credits a response) with 100 credits.
async fn bologna_pro(e: &Engine, id: &str) {
    ok(e, json!({"type": "upsert_pro", "pro": {"id": id, "categories": ["painting"], "zones": ["bologna"]}}))
        .await;
    ok(e, json!({"type": "grant_credits", "pro": id, "op": format!("pay-{id}"), "credits": 100})).await;
}

/// Auto-buyer `id` in Madrid painting (habitissimo: 12 credits a lead) with a weekly
/// budget of `weekly` credits.
fn buyer(id: &str, weekly: u64) -> Value {
    json!({"type": "upsert_pro", "pro": {"id": id, "categories": ["painting"], "zones": ["madrid"],
        "autobuy": [{"name": "main", "zones": ["madrid"], "categories": ["painting"],
                     "weekly_budget_credits": weekly}]}})
}

/// How many pros a publish's answer says were offered the lead at once.
fn offers(reply: &OkResult) -> usize {
    match reply {
        OkResult::Lead(o) => o.offers.len(),
        other => panic!("not a lead outcome: {other:?}"),
    }
}

/// How many pros an `explain` answer says were offered the lead.
fn offered(reply: &OkResult) -> usize {
    match reply {
        OkResult::Explain(x) => {
            x.entries.iter().filter(|e| matches!(e.outcome, ExplainOutcome::Offered { .. })).count()
        }
        other => panic!("not an explanation: {other:?}"),
    }
}

/// R5: a lead with a direct target is offered to it at its publish and to the others
/// at its release after the head start: one lead dispatched, three offers made. A
/// lead whose direct target is not there (no head start to give: released at once)
/// and one with no direct target are dispatched by their publish.
#[test]
fn r5_a_lead_offered_at_its_publish_and_again_at_its_release_is_dispatched_once() {
    let text = metrics_of_run("prontopro.toml", "prontopro", |e| async move {
        for p in ["p1", "p2", "p3"] {
            bologna_pro(&e, p).await;
        }
        assert_eq!(offers(&ok(&e, publish(lead("L1", "bologna", &["p1"], T0))).await), 1, "p1 at once");
        assert_eq!(offers(&ok(&e, publish(lead("L2", "bologna", &["p9"], T0))).await), 3, "p9 is not there");
        assert_eq!(offers(&ok(&e, publish(lead("L3", "bologna", &[], T0))).await), 3, "released at once");
        // The head start (30 min) is over: L1 goes to p2 and p3.
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 31 * MIN})).await;
    });
    let metric = telemetry::LEADS_DISPATCHED;
    assert_eq!(acme(&text, metric, None), 3.0, "L1, L2 and L3 once each\n{text}");
    let offers = telemetry::OFFERS_DISPATCHED;
    assert_eq!(acme(&text, offers, Some(("kind", "direct"))), 1.0, "{text}");
    assert_eq!(acme(&text, offers, Some(("kind", "generic"))), 8.0, "{text}");
    // One transition to `new` per offer made, none for the direct offer of L2 that
    // found nobody.
    assert_eq!(acme(&text, telemetry::OFFER_TRANSITIONS, Some(("status", "new"))), 9.0, "{text}");
    assert_eq!(acme(&text, telemetry::LEADS_RECEIVED, None), 3.0, "{text}");
}

/// R22: a lead bought by one buyer and retried for another when its budget comes back
/// is dispatched once; the refund that gave the budget back is counted as
/// `budget_refunded`, not `other`.
#[test]
fn r22_a_lead_retried_after_a_refund_is_dispatched_once_and_the_refund_counted_by_name() {
    let text = metrics_of_run("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", 24)).await; // two leads a week
        ok(&e, buyer("b2", 12)).await; // one
        assert_eq!(offers(&ok(&e, publish(lead("A1", "madrid", &[], T0))).await), 2, "both buy A1");
        assert_eq!(offers(&ok(&e, publish(lead("A2", "madrid", &[], T0 + MIN))).await), 1, "b1 only");
        // A1's contact is invalid for b2 (R23): its spend is refunded to its budget,
        // and A2, missed for want of it, is retried for b2 at the next housekeeping.
        ok(&e, json!({"type": "offer", "lead": "A1", "pro": "b2", "action": "confirm_invalid_contact"}))
            .await;
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 3 * MIN})).await;
        let ex = ok(&e, json!({"type": "explain", "lead": "A2"})).await;
        assert_eq!(offered(&ex), 2, "A2 retried for b2: {ex:?}");
    });
    assert_eq!(acme(&text, telemetry::LEADS_DISPATCHED, None), 2.0, "A1 and A2 once each\n{text}");
    assert_eq!(acme(&text, telemetry::OFFERS_DISPATCHED, Some(("kind", "auto_buy"))), 4.0, "{text}");
    assert_eq!(acme(&text, telemetry::OFFER_TRANSITIONS, Some(("status", "new"))), 4.0, "{text}");
    let moved = |m| acme(&text, telemetry::CREDITS_MOVED, Some(("movement", m)));
    assert_eq!(moved("budget_spent"), 48.0, "four leads at 12\n{text}");
    assert_eq!(moved("budget_refunded"), 12.0, "b2's A1\n{text}");
    assert_eq!(moved("other"), 0.0, "{text}");
}

/// Every `publish_lead` request is counted as received: a repeat of a lead id, one
/// under an id in use in another zone, an invalid lead and one the quality gate
/// refuses too; the help text says so.
#[test]
fn r1_r2_leads_received_counts_every_publish_request_repeats_and_refusals_included() {
    let text = metrics_of_run("prontopro.toml", "prontopro", |e| async move {
        ok(&e, publish(lead("L1", "bologna", &[], T0))).await;
        ok(&e, publish(lead("L1", "bologna", &[], T0))).await; // a repeat (R1)
        let conflict = send(&e, publish(lead("L1", "milano", &[], T0))).await.unwrap_err();
        assert_eq!(conflict.code, "idempotency_conflict");
        let invalid = send(&e, publish(lead("", "bologna", &[], T0))).await.unwrap_err();
        assert_eq!(invalid.code, "invalid_field");
        let mut unverified = lead("L2", "bologna", &[], T0);
        unverified["client"]["phone_verified"] = json!(false);
        ok(&e, publish(unverified)).await; // refused by the gate (R2)
    });
    assert_eq!(acme(&text, telemetry::LEADS_RECEIVED, None), 5.0, "{text}");
    let rejected = acme(&text, telemetry::LEADS_REJECTED, Some(("reason", "phone_unverified")));
    assert_eq!(rejected, 1.0, "{text}");
    let help = telemetry::def(telemetry::LEADS_RECEIVED).unwrap().help;
    assert!(!help.contains("first publish"), "{help}");
    assert!(help.contains("every one") && help.contains("repeats"), "{help}");
    let doc = repo_file("docs/OBSERVABILITY.md");
    let row = doc.lines().find(|l| l.starts_with("| `rota_leads_received_total` |")).unwrap();
    assert!(!row.contains("first publish") && row.contains("repeat"), "{row}");
}

/// R6/R7: the offers a filling response or a close ends are counted as `inactive`,
/// one per `offer_status` `inactive` the stream sends: here a lead closes (48 h) with
/// two of its three offers still open (one was answered).
#[test]
fn r6_r7_offers_a_close_ends_are_counted_inactive() {
    let text = metrics_of_run("prontopro.toml", "prontopro", |e| async move {
        for p in ["p1", "p2", "p3"] {
            bologna_pro(&e, p).await;
        }
        assert_eq!(offers(&ok(&e, publish(lead("L1", "bologna", &[], T0))).await), 3);
        ok(&e, json!({"type": "offer", "lead": "L1", "pro": "p2", "action": "open"})).await;
        ok(&e, json!({"type": "offer", "lead": "L1", "pro": "p1", "action": "respond"})).await;
        // Past its lifetime (48 h) the lead closes, p2's and p3's offers still open.
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + 49 * 60 * MIN})).await;
    });
    let status = |s| acme(&text, telemetry::OFFER_TRANSITIONS, Some(("status", s)));
    assert_eq!((status("new"), status("opened"), status("replied")), (3.0, 1.0, 1.0), "{text}");
    assert_eq!((status("inactive"), status("other")), (2.0, 0.0), "{text}");
}

/// R20: a recharge tops a budget up to its weekly budget, and `budget_recharged`
/// counts that level, not the credits added (the ledger's fact carries only the
/// level); the help text and the docs say so.
#[test]
fn r20_budget_recharged_counts_the_level_a_recharge_tops_up_to_not_the_credits_added() {
    let text = metrics_of_run("habitissimo.toml", "habitissimo", |e| async move {
        ok(&e, buyer("b1", 24)).await;
        assert_eq!(offers(&ok(&e, publish(lead("A1", "madrid", &[], T0))).await), 1, "b1 buys A1");
        // Monday 00:00 in Madrid (6 days 7 hours after T0, before A1's guarantee runs
        // out and refunds it): 12 left, topped up to 24.
        ok(&e, json!({"type": "advance_clock", "to_ms": T0 + (6 * 24 + 8) * 60 * MIN})).await;
        let b = e.inner.ledger.budget(
            &TenantId::new("acme"),
            &rota::ids::ProId::new("b1"),
            &rota::ledger::BudgetName::new("main"),
        );
        assert_eq!(b.map(|b| b.available), Some(24), "topped up");
    });
    let moved = |m| acme(&text, telemetry::CREDITS_MOVED, Some(("movement", m)));
    assert_eq!(moved("budget_spent"), 12.0, "{text}");
    assert_eq!(moved("budget_recharged"), 48.0, "the first budget, then a top-up to 24\n{text}");
    let help = telemetry::def(telemetry::CREDITS_MOVED).unwrap().help;
    assert!(help.contains("budget_recharged adds the level"), "{help}");
    let doc = repo_file("docs/OBSERVABILITY.md");
    let row = doc.lines().find(|l| l.starts_with("| `rota_credits_moved_total` |")).unwrap();
    assert!(row.contains("`budget_recharged` the level each recharge tops a budget up to"), "{row}");
}

/// An offer action on a lead rota does not know (never published, shed, or forgotten
/// after its retention) is refused before any shard, and counted like the shards'
/// refusals: `rota_responses_refused_total{code="unknown_lead"}`.
#[test]
fn an_offer_on_an_unknown_lead_is_counted_as_refused() {
    let text = metrics_of_run("prontopro.toml", "prontopro", |e| async move {
        bologna_pro(&e, "p1").await;
        let err = send(&e, json!({"type": "offer", "lead": "nope", "pro": "p1", "action": "respond"}))
            .await
            .expect_err("unknown lead");
        assert_eq!(err.code, "unknown_lead");
    });
    assert_eq!(acme(&text, telemetry::RESPONSES_REFUSED, Some(("code", "unknown_lead"))), 1.0, "{text}");
}

/// Shards per tenant, and their share of `max_shards_per_tenant` (100,000 by default),
/// sampled by the engine's figures: two shards after a pro in one zone and a lead in
/// another.
#[test]
fn the_tenants_shards_and_their_share_of_the_bound_are_reported() {
    let text = metrics_of_run("zaask.toml", "zaask", |e| async move {
        ok(&e, json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"], "zones": ["lisboa"]}}))
            .await;
        ok(&e, publish(lead("L1", "porto", &[], T0))).await;
        e.observe();
    });
    assert_eq!(acme(&text, telemetry::TENANT_SHARDS, None), 2.0, "{text}");
    assert_eq!(acme(&text, telemetry::TENANT_SHARDS_USED, None), 2.0 / 100_000.0, "{text}");
}
