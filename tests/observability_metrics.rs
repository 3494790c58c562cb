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
        m.wal.record_batch(64, 8192, Some(Duration::from_micros(250)));
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
