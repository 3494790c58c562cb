//! The global recorder as the daemon installs it, and the metrics dump that
//! `tests/observability/check.sh static` lints with `promtool check metrics`.
//!
//! Write the dump with:
//! `cargo test --test observability_metrics -- --ignored dump_metrics`
//! (to `$ROTA_METRICS_DUMP`, default `target/observability/metrics.prom`).

use rota::telemetry::{self, Metrics, TenantMetrics, WalStatsLike, ALL};
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
