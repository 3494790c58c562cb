//! Telemetry: every metric name, unit, help text and bucket layout, the Prometheus
//! recorder, pre-registered metric handles for hot paths, and structured logs.
//!
//! # Rules
//! - Every metric rota exports is a row of [`ALL`]; [`describe_all`] describes each
//!   once at start-up and a unit test checks names against Prometheus conventions
//!   (`rota_` prefix, base units in the name, `_total` on counters).
//! - Every histogram has explicit buckets ([`MetricDef::buckets`]): the exporter
//!   renders `_bucket` series, never summaries, so percentiles can be aggregated
//!   across instances with `histogram_quantile`.
//! - Labels come from bounded sets only ([`TENANT`] values come from the config; the
//!   others are the `*_VALUES` constants below). An unknown label value is counted
//!   under [`OTHER`], so a caller can never grow the series count. Never pro, lead,
//!   zone or client ids.
//! - Hot paths never look a metric up by name: they hold a [`Metrics`] /
//!   [`TenantMetrics`] built once, whose labelled handles are created eagerly, so
//!   every series exists (at zero) from the first scrape.
//!
//! # Log fields
//! Stable structured field names, for queries in log tooling: `tenant`, `shard`
//! (`tenant/zone/category`), `lead_id`, `pro_id`, `code` (a reject or error code),
//! `seq` (a stream or WAL sequence), `peer` (a remote socket address). Never log
//! client PII (names, phones, addresses, free-text details) or tokens, not even at
//! `trace` level: log the lead id and let the operator look the lead up.

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use std::io::IsTerminal;

// ---------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------

pub const BUILD_INFO: &str = "rota_build_info";

// Business (labelled by tenant).
pub const LEADS_RECEIVED: &str = "rota_leads_received_total";
pub const LEADS_REJECTED: &str = "rota_leads_rejected_total";
pub const LEADS_DISPATCHED: &str = "rota_leads_dispatched_total";
pub const OFFERS_DISPATCHED: &str = "rota_offers_dispatched_total";
pub const OFFER_TRANSITIONS: &str = "rota_offer_transitions_total";
pub const RESPONSES_REFUSED: &str = "rota_responses_refused_total";
pub const CREDITS_MOVED: &str = "rota_credits_moved_total";
pub const LEDGER_SETTLE_FAILURES: &str = "rota_ledger_settle_failures_total";
/// `op` of [`LEDGER_SETTLE_FAILURES`].
pub const SETTLE_OPS: &[&str] = &["capture", "release", "refund"];
pub const TOPUPS_REQUESTED: &str = "rota_topups_requested_total";
pub const FAIRNESS_DEVIATION: &str = "rota_fairness_share_deviation_ratio";
pub const FAIRNESS_MAX_DEVIATION: &str = "rota_fairness_max_share_deviation_ratio";
pub const PROS_PARKED: &str = "rota_pros_parked";
pub const TENANT_SHARDS: &str = "rota_tenant_shards";
pub const TENANT_SHARDS_USED: &str = "rota_tenant_shards_used_ratio";

// Runtime.
pub const SHARDS_ALIVE: &str = "rota_shards_alive";
pub const MAILBOX_DEPTH_MAX: &str = "rota_mailbox_depth_max";
pub const CLOCK_BEHIND: &str = "rota_clock_behind_seconds";
pub const OVERLOAD_REFUSALS: &str = "rota_overload_refusals_total";

// Write-ahead log.
pub const WAL_BYTES_WRITTEN: &str = "rota_wal_written_bytes_total";
pub const WAL_RECORDS: &str = "rota_wal_records_total";
pub const WAL_BATCHES: &str = "rota_wal_batches_total";
pub const WAL_SYNCS: &str = "rota_wal_syncs_total";
pub const WAL_SYNC_INTERVAL_WAITS: &str = "rota_wal_sync_interval_waits_total";
pub const WAL_SYNC_FAILURES: &str = "rota_wal_sync_failures_total";
pub const WAL_SEGMENTS_LIVE: &str = "rota_wal_segments_live";
pub const WAL_SEGMENTS_REUSED: &str = "rota_wal_segments_reused_total";
pub const WAL_SPARE_FAILURES: &str = "rota_wal_spare_failures_total";
pub const WAL_DURABLE_SEQUENCE: &str = "rota_wal_durable_sequence";
pub const WAL_FAILED: &str = "rota_wal_failed";
pub const WAL_SNAPSHOTS: &str = "rota_wal_snapshots_total";
pub const WAL_SYNC_DURATION: &str = "rota_wal_sync_duration_seconds";
pub const WAL_BATCH_RECORDS: &str = "rota_wal_batch_records";
pub const SNAPSHOT_DURATION: &str = "rota_snapshot_duration_seconds";
pub const SNAPSHOT_FAILURES: &str = "rota_snapshot_failures_total";
pub const SNAPSHOT_PAUSE: &str = "rota_snapshot_pause_seconds";
pub const RECOVERY_DURATION: &str = "rota_recovery_duration_seconds";
pub const RECOVERY_RECORDS: &str = "rota_recovery_replayed_records";

// Gateway (websockets).
pub const CONNECTIONS: &str = "rota_connections";
pub const FRAMES_RECEIVED: &str = "rota_frames_received_total";
pub const FRAMES_SENT: &str = "rota_frames_sent_total";
pub const AUTH_FAILURES: &str = "rota_auth_failures_total";
pub const SLOW_SUBSCRIBER_DISCONNECTS: &str = "rota_slow_subscriber_disconnects_total";
pub const STREAM_RESUMES: &str = "rota_stream_resumes_total";
pub const CONFIG_RELOADS: &str = "rota_config_reloads_total";
/// `result` of [`CONFIG_RELOADS`].
pub const RELOAD_RESULTS: &[&str] = &["ok", "error"];
pub const STREAM_HISTORY_BYTES: &str = "rota_stream_history_bytes";
pub const STREAM_HISTORY_RESTARTS: &str = "rota_stream_history_restarts_total";

// Latency.
pub const DECIDE_DURATION: &str = "rota_decide_duration_seconds";
pub const INGEST_TO_DURABLE: &str = "rota_ingest_to_durable_seconds";
pub const INGEST_TO_DELIVERY: &str = "rota_ingest_to_delivery_seconds";

// Process (read from /proc at scrape time; standard client-library names).
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_THREADS: &str = "process_threads";

// ---------------------------------------------------------------------------
// Label sets
// ---------------------------------------------------------------------------

pub const TENANT: &str = "tenant";
/// The value an unknown label value is counted under.
pub const OTHER: &str = "other";

/// `reason` of [`LEADS_REJECTED`] (R2 quality gate, duplicate protection).
pub const REJECT_REASONS: &[&str] = &["phone_unverified", "insufficient_details", "competitor", "duplicate"];
/// `kind` of [`OFFERS_DISPATCHED`] (R5, R13, R21).
pub const OFFER_KINDS: &[&str] = &["direct", "generic", "match", "auto_buy", "contact"];
/// `status` of [`OFFER_TRANSITIONS`]: the status an offer moved to (R17). `inactive`
/// counts the offers a response that fills the lead (R6) or its close (R7) ends, as
/// the stream tells them (`Shard::inactivated_by`).
pub const OFFER_STATUSES: &[&str] =
    &["new", "opened", "declined", "expired", "replied", "awaiting_response", "completed", "inactive"];
/// `code` of [`RESPONSES_REFUSED`]: the core's reject codes.
pub const REFUSAL_CODES: &[&str] = &[
    "lead_full",
    "lead_expired",
    "offer_expired",
    "insufficient_credits",
    "illegal_transition",
    "not_offered",
    "unknown_lead",
    "unknown_pro",
    "idempotency_conflict",
    "invalid_field",
];
/// `movement` of [`CREDITS_MOVED`] (ledger operations): the `movement` of the
/// stream's `credits` events.
pub const CREDIT_MOVEMENTS: &[&str] = &[
    "charged",
    "held",
    "captured",
    "released",
    "refunded",
    "granted",
    "budget_spent",
    "budget_recharged",
    "budget_refunded",
];
/// `reason` of [`OVERLOAD_REFUSALS`]: which bounded queue was full.
pub const OVERLOAD_REASONS: &[&str] = &[
    "mailbox_full",
    "wal_queue_full",
    "connections_full",
    "tenant_connections_full",
    "fd_limit",
    "rate_limited",
    "gateway_backlog",
    "connection_in_flight",
    "pro_changes",
];
/// `scope` of [`CONNECTIONS`]: what the connection's token allows it to do.
/// A connection is counted once authenticated, under its token's widest scope.
pub const SCOPES: &[&str] = &["ingest", "stream", "admin"];
/// `encoding` of [`FRAMES_RECEIVED`] / [`FRAMES_SENT`].
pub const ENCODINGS: &[&str] = &["json", "msgpack"];
/// `reason` of [`AUTH_FAILURES`].
pub const AUTH_FAILURE_REASONS: &[&str] =
    &["missing_token", "invalid_token", "forbidden_scope", "bad_subprotocol", "token_revoked"];
/// `outcome` of [`STREAM_RESUMES`]: `replayed` = the gap was served from retention,
/// `too_old` = the requested sequence fell out of retention.
pub const RESUME_OUTCOMES: &[&str] = &["replayed", "from_disk", "too_old"];

// ---------------------------------------------------------------------------
// Buckets
// ---------------------------------------------------------------------------

/// 1 us .. 10 ms: the matching decision (target: median < 2 us, p99 < 10 us).
pub const DECIDE_BUCKETS: &[f64] =
    &[1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2];
/// 50 us .. 1 s: publish-to-durable and publish-to-delivery. 1 ms and 3 ms are
/// bucket bounds because they are the p50 and p99 targets.
pub const PIPELINE_BUCKETS: &[f64] =
    &[5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0];
/// 50 us .. 1 s: one fdatasync (about 0.25 ms median on the reference disk).
pub const SYNC_BUCKETS: &[f64] =
    &[5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0];
/// 1 .. 4096 records per group commit.
pub const BATCH_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];
/// 1 ms .. 60 s: writing one snapshot.
pub const SNAPSHOT_BUCKETS: &[f64] =
    &[1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// 0.01 .. 2: relative deviation of a pro's offered share from its entitled share.
pub const FAIRNESS_BUCKETS: &[f64] = &[0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0];

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    /// `seconds`, `bytes`, `ratio`, or a count noun (`leads`, `credits`, ...).
    pub unit: &'static str,
    pub labels: &'static [&'static str],
    pub help: &'static str,
    /// Explicit buckets; `Some` exactly for histograms.
    pub buckets: Option<&'static [f64]>,
}

const fn m(
    name: &'static str,
    kind: Kind,
    unit: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricDef {
    MetricDef { name, kind, unit, labels, help, buckets: None }
}

const fn h(
    name: &'static str,
    unit: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    help: &'static str,
) -> MetricDef {
    MetricDef { name, kind: Kind::Histogram, unit, labels, help, buckets: Some(buckets) }
}

use Kind::{Counter as C, Gauge as G};

/// Every metric rota exports. `describe_all` describes these, `install` sets the
/// buckets of the histograms, and `docs/OBSERVABILITY.md` documents them.
pub const ALL: &[MetricDef] = &[
    m(BUILD_INFO, G, "info", &["version", "git_sha"], "Always 1; the labels name the running build."),
    // Business.
    m(
        LEADS_RECEIVED,
        C,
        "leads",
        &[TENANT],
        "Lead publish requests (publish_lead) handled: every one, repeats of a lead id and invalid or refused ones included.",
    ),
    m(
        LEADS_REJECTED,
        C,
        "leads",
        &[TENANT, "reason"],
        "Leads refused by the quality gate (R2) or as duplicates.",
    ),
    m(
        LEADS_DISPATCHED,
        C,
        "leads",
        &[TENANT],
        "Leads offered to at least one pro, each counted once, at its first offer (its publish, else its release or an R22 retry).",
    ),
    m(OFFERS_DISPATCHED, C, "offers", &[TENANT, "kind"], "Offers made to pros, by offer kind."),
    m(
        OFFER_TRANSITIONS,
        C,
        "offers",
        &[TENANT, "status"],
        "Offer status changes, by the status entered (R17); new = offers made.",
    ),
    m(RESPONSES_REFUSED, C, "responses", &[TENANT, "code"], "Pro responses/actions refused, by reject code."),
    m(
        CREDITS_MOVED,
        C,
        "credits",
        &[TENANT, "movement"],
        "Credits moved by the ledger, by kind of movement; budget_recharged adds the level each recharge tops a budget up to (the weekly budget, R20), not credits added.",
    ),
    m(
        LEDGER_SETTLE_FAILURES,
        C,
        "settlements",
        &["op"],
        "Captures, releases and refunds the core decided and the ledger refused: a bug (money held or owed), never expected.",
    ),
    m(TOPUPS_REQUESTED, C, "events", &[TENANT], "topup_requested events emitted (R10)."),
    h(
        FAIRNESS_DEVIATION,
        "ratio",
        &[TENANT],
        FAIRNESS_BUCKETS,
        "Per pro, |offered share - entitled share| / entitled share, sampled per fairness evaluation.",
    ),
    m(
        FAIRNESS_MAX_DEVIATION,
        G,
        "ratio",
        &[TENANT],
        "Largest relative share deviation of any pro at the last fairness evaluation.",
    ),
    m(
        PROS_PARKED,
        G,
        "pros",
        &[TENANT, "reason"],
        "Pros parked out of the rotation's scan, summed over shards: reason budget = every auto-buy budget spent (until it comes back), unavailable = paused, on vacation, outside the schedule or with no buying config.",
    ),
    m(TENANT_SHARDS, G, "shards", &[TENANT], "The tenant's zone x category shards."),
    m(
        TENANT_SHARDS_USED,
        G,
        "ratio",
        &[TENANT],
        "The tenant's shards over max_shards_per_tenant: at 1 a lead or pro naming a new zone x category pair is refused shard_limit.",
    ),
    // Runtime.
    m(SHARDS_ALIVE, G, "shards", &[], "Shards in memory (each with its timer actor)."),
    m(
        MAILBOX_DEPTH_MAX,
        G,
        "messages",
        &[],
        "Most commands in flight on one shard (deciding or waiting for the log) at the last sample.",
    ),
    m(OVERLOAD_REFUSALS, C, "requests", &["reason"], "Requests refused because a bounded queue was full."),
    m(
        CLOCK_BEHIND,
        G,
        "seconds",
        &[],
        "How far the wall clock is behind rota's time (the latest time handed out or logged): while above 0, rota's time holds instead of running backwards. 0 normally.",
    ),
    // WAL.
    m(WAL_BYTES_WRITTEN, C, "bytes", &[], "Bytes appended to the write-ahead log."),
    m(WAL_RECORDS, C, "records", &[], "Records appended to the write-ahead log."),
    m(WAL_BATCHES, C, "batches", &[], "Group-commit batches written."),
    m(WAL_SYNCS, C, "syncs", &[], "fdatasync calls that succeeded."),
    m(
        WAL_SYNC_INTERVAL_WAITS,
        C,
        "batches",
        &[],
        "Batches that waited for wal.min_sync_interval_us (appends overlapped) before being written.",
    ),
    m(
        WAL_SYNC_FAILURES,
        C,
        "syncs",
        &[],
        "fdatasync or write calls that failed; the WAL stops accepting on failure.",
    ),
    m(WAL_SEGMENTS_LIVE, G, "segments", &[], "WAL segment files on disk."),
    m(
        WAL_SEGMENTS_REUSED,
        C,
        "segments",
        &[],
        "New WAL segments made from a compacted one kept for reuse (wal.recycle_segments) instead of a zero-filled new file.",
    ),
    m(
        WAL_SPARE_FAILURES,
        C,
        "attempts",
        &[],
        "Failed attempts to prepare the next WAL segment ahead of time (wal.preallocate); retried after 250 ms, doubling up to 30 s.",
    ),
    m(WAL_DURABLE_SEQUENCE, G, "sequence", &[], "Highest WAL sequence number known durable."),
    m(WAL_FAILED, G, "bool", &[], "1 when the WAL has failed and refuses appends, else 0."),
    m(WAL_SNAPSHOTS, C, "snapshots", &[], "Snapshots written."),
    h(WAL_SYNC_DURATION, "seconds", &[], SYNC_BUCKETS, "Duration of one WAL fdatasync."),
    h(WAL_BATCH_RECORDS, "records", &[], BATCH_BUCKETS, "Records per group-commit batch."),
    h(SNAPSHOT_DURATION, "seconds", &[], SNAPSHOT_BUCKETS, "Duration of writing one snapshot."),
    m(
        SNAPSHOT_FAILURES,
        C,
        "snapshots",
        &[],
        "Periodic snapshots that failed (the log is not compacted meanwhile: it grows, and so does the next start's replay).",
    ),
    h(
        SNAPSHOT_PAUSE,
        "seconds",
        &[],
        SNAPSHOT_BUCKETS,
        "How long one snapshot held decisions back (taking its consistent cut).",
    ),
    m(RECOVERY_DURATION, G, "seconds", &[], "Duration of the start-up recovery (snapshot load + replay)."),
    m(RECOVERY_RECORDS, G, "records", &[], "WAL records replayed by the start-up recovery."),
    // Gateway.
    m(CONNECTIONS, G, "connections", &["scope"], "Open websocket connections, by token scope."),
    m(FRAMES_RECEIVED, C, "frames", &["encoding"], "Websocket frames received, by encoding."),
    m(FRAMES_SENT, C, "frames", &["encoding"], "Live stream frames sent to subscribers, by encoding."),
    m(AUTH_FAILURES, C, "attempts", &["reason"], "Connections or requests refused by authentication."),
    m(
        CONFIG_RELOADS,
        C,
        "reloads",
        &["result"],
        "Configuration reloads (SIGHUP): applied, or refused with the previous configuration kept.",
    ),
    m(
        SLOW_SUBSCRIBER_DISCONNECTS,
        C,
        "connections",
        &[],
        "Connections cut off for not keeping up: a subscriber whose queue filled (4008), or a peer that read nothing for send_timeout_ms.",
    ),
    m(STREAM_RESUMES, C, "requests", &["outcome"], "Stream subscriptions that resumed from a sequence."),
    m(
        STREAM_HISTORY_BYTES,
        G,
        "bytes",
        &[TENANT],
        "Stream history on disk (events evicted from the replay buffer, stream_spill_bytes).",
    ),
    m(
        STREAM_HISTORY_RESTARTS,
        C,
        "restarts",
        &[TENANT],
        "Times the stream history on disk was dropped because it no longer joined the stream (a crash, a disk that fell behind, a write error).",
    ),
    // Latency.
    h(DECIDE_DURATION, "seconds", &[], DECIDE_BUCKETS, "Time the pure core spends deciding one command."),
    h(
        INGEST_TO_DURABLE,
        "seconds",
        &[],
        PIPELINE_BUCKETS,
        "From a decision's command entering the engine (a publish, a response, a pro change, a tick) to its record being durable.",
    ),
    h(
        INGEST_TO_DELIVERY,
        "seconds",
        &[],
        PIPELINE_BUCKETS,
        "From a decision that makes offers entering the engine to its events handed to the subscribers' queues, once durable.",
    ),
    // Process.
    m(PROCESS_RESIDENT_MEMORY, G, "bytes", &[], "Resident memory size in bytes."),
    m(PROCESS_VIRTUAL_MEMORY, G, "bytes", &[], "Virtual memory size in bytes."),
    m(PROCESS_OPEN_FDS, G, "fds", &[], "Open file descriptors."),
    m(PROCESS_MAX_FDS, G, "fds", &[], "Maximum number of open file descriptors (soft limit)."),
    m(PROCESS_THREADS, G, "threads", &[], "OS threads in the process."),
];

/// The row of `name`, if rota exports it.
pub fn def(name: &str) -> Option<&'static MetricDef> {
    ALL.iter().find(|d| d.name == name)
}

// ---------------------------------------------------------------------------
// Recorder
// ---------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metrics recorder: {0}")]
    Recorder(#[from] BuildError),
    #[error("log filter {filter:?}: {reason}")]
    LogFilter { filter: String, reason: String },
    #[error("logging already initialised: {0}")]
    LogInit(String),
}

/// The version label of [`BUILD_INFO`].
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git_sha label of [`BUILD_INFO`]: `ROTA_GIT_SHA` at compile time, if set.
pub const GIT_SHA: &str = match option_env!("ROTA_GIT_SHA") {
    Some(s) => s,
    None => "unknown",
};

/// A Prometheus builder with rota's bucket layout. Every histogram in [`ALL`] gets
/// its explicit buckets; any other histogram falls back to [`PIPELINE_BUCKETS`], so
/// the exporter never renders a summary.
pub fn builder() -> PrometheusBuilder {
    let mut b = PrometheusBuilder::new()
        .set_buckets(PIPELINE_BUCKETS)
        .expect("PIPELINE_BUCKETS is a non-empty constant");
    for d in ALL {
        if let Some(buckets) = d.buckets {
            b = b
                .set_buckets_for_metric(Matcher::Full(d.name.to_string()), buckets)
                .expect("bucket constants are non-empty");
        }
    }
    b
}

/// Installs the global recorder, describes every metric and sets [`BUILD_INFO`].
/// Call once, at start-up, before building any [`Metrics`]; serve the returned
/// handle on `/metrics` (`server::admin`), which also runs its upkeep.
pub fn install() -> Result<PrometheusHandle, TelemetryError> {
    let handle = builder().install_recorder()?;
    describe_all();
    set_build_info();
    Ok(handle)
}

/// Describes every metric of [`ALL`] to the current recorder.
pub fn describe_all() {
    for d in ALL {
        let unit = match d.unit {
            "seconds" => Unit::Seconds,
            "bytes" => Unit::Bytes,
            _ => Unit::Count,
        };
        match d.kind {
            Kind::Counter => metrics::describe_counter!(d.name, unit, d.help),
            Kind::Gauge => metrics::describe_gauge!(d.name, unit, d.help),
            Kind::Histogram => metrics::describe_histogram!(d.name, unit, d.help),
        }
    }
}

/// Sets `rota_build_info{version, git_sha} 1`.
pub fn set_build_info() {
    metrics::gauge!(BUILD_INFO, "version" => VERSION, "git_sha" => GIT_SHA).set(1.0);
}

/// Reads process figures from `/proc/self` into the `process_*` gauges. Called by
/// the admin server on each scrape (not a hot path). Figures that cannot be read
/// (non-Linux) are left unset.
pub fn refresh_process_metrics() {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for (key, name, scale) in [
            ("VmRSS:", PROCESS_RESIDENT_MEMORY, 1024.0),
            ("VmSize:", PROCESS_VIRTUAL_MEMORY, 1024.0),
            ("Threads:", PROCESS_THREADS, 1.0),
        ] {
            if let Some(v) = proc_field(&status, key) {
                metrics::gauge!(name).set(v * scale);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The count includes the descriptor read_dir itself holds.
        metrics::gauge!(PROCESS_OPEN_FDS).set(dir.count().saturating_sub(1) as f64);
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        let soft = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l["Max open files".len()..].split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = soft {
            metrics::gauge!(PROCESS_MAX_FDS).set(v);
        }
    }
}

/// `VmRSS:   1234 kB` -> 1234.0
fn proc_field(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------

/// One handle per value of a bounded label set, plus one for [`OTHER`]. Built once;
/// [`ByLabel::get`] is a scan over a handful of short strings, no allocation, no
/// registry lookup.
#[derive(Clone)]
pub struct ByLabel<H> {
    values: &'static [&'static str],
    handles: Box<[H]>,
    other: H,
}

impl<H> ByLabel<H> {
    fn new(values: &'static [&'static str], make: impl Fn(&'static str) -> H) -> Self {
        ByLabel { values, handles: values.iter().copied().map(&make).collect(), other: make(OTHER) }
    }

    /// The handle of `value`; unknown values share the [`OTHER`] handle.
    pub fn get(&self, value: &str) -> &H {
        match self.values.iter().position(|v| *v == value) {
            Some(i) => &self.handles[i],
            None => &self.other,
        }
    }
}

/// The business metrics of one tenant. Build one per configured tenant at start-up
/// (`TenantMetrics::new(tenant)`) and keep it next to the tenant's state.
#[derive(Clone)]
pub struct TenantMetrics {
    pub leads_received: Counter,
    pub leads_dispatched: Counter,
    pub topups_requested: Counter,
    pub leads_rejected: ByLabel<Counter>,
    pub offers_dispatched: ByLabel<Counter>,
    pub offer_transitions: ByLabel<Counter>,
    pub responses_refused: ByLabel<Counter>,
    pub credits_moved: ByLabel<Counter>,
    pub fairness_deviation: Histogram,
    pub fairness_max_deviation: Gauge,
    pub stream_history_bytes: Gauge,
    pub stream_history_restarts: Counter,
    pub pros_parked_budget: Gauge,
    pub pros_parked_unavailable: Gauge,
    pub shards: Gauge,
    pub shards_used: Gauge,
}

impl TenantMetrics {
    pub fn new(tenant: &str) -> Self {
        let t = tenant.to_string();
        let labelled = |name: &'static str, label: &'static str, values: &'static [&'static str]| {
            let t = t.clone();
            ByLabel::new(values, move |v| metrics::counter!(name, TENANT => t.clone(), label => v))
        };
        TenantMetrics {
            leads_received: metrics::counter!(LEADS_RECEIVED, TENANT => t.clone()),
            leads_dispatched: metrics::counter!(LEADS_DISPATCHED, TENANT => t.clone()),
            topups_requested: metrics::counter!(TOPUPS_REQUESTED, TENANT => t.clone()),
            leads_rejected: labelled(LEADS_REJECTED, "reason", REJECT_REASONS),
            offers_dispatched: labelled(OFFERS_DISPATCHED, "kind", OFFER_KINDS),
            offer_transitions: labelled(OFFER_TRANSITIONS, "status", OFFER_STATUSES),
            responses_refused: labelled(RESPONSES_REFUSED, "code", REFUSAL_CODES),
            credits_moved: labelled(CREDITS_MOVED, "movement", CREDIT_MOVEMENTS),
            fairness_deviation: metrics::histogram!(FAIRNESS_DEVIATION, TENANT => t.clone()),
            fairness_max_deviation: metrics::gauge!(FAIRNESS_MAX_DEVIATION, TENANT => t.clone()),
            stream_history_bytes: metrics::gauge!(STREAM_HISTORY_BYTES, TENANT => t.clone()),
            pros_parked_budget: metrics::gauge!(PROS_PARKED, TENANT => t.clone(), "reason" => "budget"),
            pros_parked_unavailable: metrics::gauge!(PROS_PARKED, TENANT => t.clone(), "reason" => "unavailable"),
            shards: metrics::gauge!(TENANT_SHARDS, TENANT => t.clone()),
            shards_used: metrics::gauge!(TENANT_SHARDS_USED, TENANT => t.clone()),
            stream_history_restarts: metrics::counter!(STREAM_HISTORY_RESTARTS, TENANT => t),
        }
    }

    /// Records one fairness evaluation: `(offered_share, entitled_share)` per pro,
    /// shares as fractions of the leads offered in the window. Pros with no
    /// entitlement are skipped (their deviation is undefined).
    ///
    /// With no share to judge (no shard of the tenant judged in the window) the max
    /// is NaN: no figure, rather than a perfect one or the last busy window's.
    pub fn observe_fairness(&self, shares: impl IntoIterator<Item = (f64, f64)>) {
        let mut max = f64::NAN;
        for (offered, entitled) in shares {
            if entitled <= 0.0 || !entitled.is_finite() || !offered.is_finite() {
                continue;
            }
            let dev = (offered - entitled).abs() / entitled;
            self.fairness_deviation.record(dev);
            max = if max.is_nan() { dev } else { max.max(dev) };
        }
        self.fairness_max_deviation.set(max);
    }
}

/// Node-wide handles: runtime, gateway and latency. Build once at start-up after
/// [`install`], share by `Arc` or clone (handles are cheap `Arc`s).
#[derive(Clone)]
pub struct Metrics {
    pub shards_alive: Gauge,
    pub mailbox_depth_max: Gauge,
    pub clock_behind: Gauge,
    pub overload_refusals: ByLabel<Counter>,
    pub connections: ByLabel<Gauge>,
    pub frames_received: ByLabel<Counter>,
    pub frames_sent: ByLabel<Counter>,
    pub auth_failures: ByLabel<Counter>,
    pub config_reloads: ByLabel<Counter>,
    pub settle_failures: ByLabel<Counter>,
    pub slow_subscriber_disconnects: Counter,
    pub stream_resumes: ByLabel<Counter>,
    pub decide_duration: Histogram,
    pub ingest_to_durable: Histogram,
    pub ingest_to_delivery: Histogram,
    pub wal: WalMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let counters = |name: &'static str, label: &'static str, values: &'static [&'static str]| {
            ByLabel::new(values, move |v| metrics::counter!(name, label => v))
        };
        Metrics {
            shards_alive: metrics::gauge!(SHARDS_ALIVE),
            mailbox_depth_max: metrics::gauge!(MAILBOX_DEPTH_MAX),
            clock_behind: metrics::gauge!(CLOCK_BEHIND),
            overload_refusals: counters(OVERLOAD_REFUSALS, "reason", OVERLOAD_REASONS),
            connections: ByLabel::new(SCOPES, |v| metrics::gauge!(CONNECTIONS, "scope" => v)),
            frames_received: counters(FRAMES_RECEIVED, "encoding", ENCODINGS),
            frames_sent: counters(FRAMES_SENT, "encoding", ENCODINGS),
            auth_failures: counters(AUTH_FAILURES, "reason", AUTH_FAILURE_REASONS),
            config_reloads: counters(CONFIG_RELOADS, "result", RELOAD_RESULTS),
            settle_failures: counters(LEDGER_SETTLE_FAILURES, "op", SETTLE_OPS),
            slow_subscriber_disconnects: metrics::counter!(SLOW_SUBSCRIBER_DISCONNECTS),
            stream_resumes: counters(STREAM_RESUMES, "outcome", RESUME_OUTCOMES),
            decide_duration: metrics::histogram!(DECIDE_DURATION),
            ingest_to_durable: metrics::histogram!(INGEST_TO_DURABLE),
            ingest_to_delivery: metrics::histogram!(INGEST_TO_DELIVERY),
            wal: WalMetrics::new(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Cumulative WAL counters, as the WAL reports them (`wal::WalStats` maps onto this
/// field by field; kept separate so telemetry does not depend on the WAL module).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStatsLike {
    pub bytes_written: u64,
    pub records: u64,
    pub batches: u64,
    pub syncs: u64,
    pub sync_interval_waits: u64,
    pub sync_failures: u64,
    pub segments_live: u64,
    pub segments_reused: u64,
    pub spare_failures: u64,
    pub snapshots_written: u64,
    /// Highest durable sequence.
    pub durable_seq: u64,
    pub failed: bool,
}

/// WAL handles. The histograms are fed by the writer thread, one sample per batch
/// and per sync ([`WalMetrics`] is the log's [`crate::wal::WalObserver`]); counters
/// and gauges by a sampler calling [`WalMetrics::observe`] with the cumulative stats.
#[derive(Clone)]
pub struct WalMetrics {
    pub bytes_written: Counter,
    pub records: Counter,
    pub batches: Counter,
    pub syncs: Counter,
    pub sync_interval_waits: Counter,
    pub sync_failures: Counter,
    pub snapshots: Counter,
    pub segments_live: Gauge,
    pub segments_reused: Counter,
    pub spare_failures: Counter,
    pub durable_sequence: Gauge,
    pub failed: Gauge,
    pub sync_duration: Histogram,
    pub batch_records: Histogram,
    pub snapshot_duration: Histogram,
    pub snapshot_failures: Counter,
    pub snapshot_pause: Histogram,
    pub recovery_duration: Gauge,
    pub recovery_records: Gauge,
}

impl crate::wal::WalObserver for WalMetrics {
    fn batch(&self, records: u64) {
        self.batch_records.record(records as f64);
    }
    fn synced(&self, took: std::time::Duration) {
        self.sync_duration.record(took);
    }
}

impl WalMetrics {
    pub fn new() -> Self {
        WalMetrics {
            bytes_written: metrics::counter!(WAL_BYTES_WRITTEN),
            records: metrics::counter!(WAL_RECORDS),
            batches: metrics::counter!(WAL_BATCHES),
            syncs: metrics::counter!(WAL_SYNCS),
            sync_interval_waits: metrics::counter!(WAL_SYNC_INTERVAL_WAITS),
            sync_failures: metrics::counter!(WAL_SYNC_FAILURES),
            snapshots: metrics::counter!(WAL_SNAPSHOTS),
            segments_live: metrics::gauge!(WAL_SEGMENTS_LIVE),
            segments_reused: metrics::counter!(WAL_SEGMENTS_REUSED),
            spare_failures: metrics::counter!(WAL_SPARE_FAILURES),
            durable_sequence: metrics::gauge!(WAL_DURABLE_SEQUENCE),
            failed: metrics::gauge!(WAL_FAILED),
            sync_duration: metrics::histogram!(WAL_SYNC_DURATION),
            batch_records: metrics::histogram!(WAL_BATCH_RECORDS),
            snapshot_duration: metrics::histogram!(SNAPSHOT_DURATION),
            snapshot_failures: metrics::counter!(SNAPSHOT_FAILURES),
            snapshot_pause: metrics::histogram!(SNAPSHOT_PAUSE),
            recovery_duration: metrics::gauge!(RECOVERY_DURATION),
            recovery_records: metrics::gauge!(RECOVERY_RECORDS),
        }
    }

    /// Publishes cumulative stats: counters are set absolutely (so sampling twice is
    /// harmless) and gauges set. The histograms are not sampled here: one sample per
    /// scrape of thousands of syncs would hide the slow ones.
    pub fn observe(&self, s: &WalStatsLike) {
        self.bytes_written.absolute(s.bytes_written);
        self.records.absolute(s.records);
        self.batches.absolute(s.batches);
        self.syncs.absolute(s.syncs);
        self.sync_interval_waits.absolute(s.sync_interval_waits);
        self.sync_failures.absolute(s.sync_failures);
        self.snapshots.absolute(s.snapshots_written);
        self.segments_live.set(s.segments_live as f64);
        self.segments_reused.absolute(s.segments_reused);
        self.spare_failures.absolute(s.spare_failures);
        self.durable_sequence.set(s.durable_seq as f64);
        self.failed.set(if s.failed { 1.0 } else { 0.0 });
    }

    /// Records the start-up recovery.
    pub fn record_recovery(&self, duration: std::time::Duration, records_replayed: u64) {
        self.recovery_duration.set(duration.as_secs_f64());
        self.recovery_records.set(records_replayed as f64);
    }
}

impl Default for WalMetrics {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

/// How log lines are written to stderr. `config::LogFormat` maps onto this:
/// `Auto -> LogOutput::auto()`, `Json -> Json`, `Text -> Text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// One JSON object per line, event fields at the top level.
    Json,
    /// Human-readable lines.
    Text,
}

impl LogOutput {
    /// JSON unless stderr is a terminal (`log_format = "auto"`).
    pub fn auto() -> Self {
        if std::io::stderr().is_terminal() {
            LogOutput::Text
        } else {
            LogOutput::Json
        }
    }
}

/// The filter in effect: `RUST_LOG` when set and non-empty (an operator's override
/// at the shell), else `level` from the config (`log_level`, `ROTA_LOG_LEVEL`).
pub fn log_filter(level: &str, rust_log: Option<&str>) -> String {
    match rust_log {
        Some(s) if !s.trim().is_empty() => s.to_string(),
        _ => level.to_string(),
    }
}

/// [`log_filter`], falling back to `level` when `RUST_LOG` is not a filter (with the
/// reason, to be logged).
pub fn usable_log_filter(level: &str, rust_log: Option<&str>) -> (String, Option<TelemetryError>) {
    let filter = log_filter(level, rust_log);
    match env_filter(&filter) {
        Err(e) if filter != level => (level.to_string(), Some(e)),
        _ => (filter, None),
    }
}

fn env_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, TelemetryError> {
    tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| TelemetryError::LogFilter { filter: filter.to_string(), reason: e.to_string() })
}

/// A subscriber writing to `writer`; `init_logging` uses stderr, tests a buffer.
pub fn log_subscriber<W>(
    filter: &str,
    output: LogOutput,
    writer: W,
) -> Result<Box<dyn tracing::Subscriber + Send + Sync>, TelemetryError>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = env_filter(filter)?;
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    Ok(match output {
        LogOutput::Json => {
            Box::new(b.json().flatten_event(true).with_current_span(false).with_span_list(false).finish())
        }
        LogOutput::Text => Box::new(b.with_ansi(false).finish()),
    })
}

/// Installs the global log subscriber on stderr. `level` is a `RUST_LOG`-style
/// filter (`info`, `rota=debug,tokio=warn`); `RUST_LOG` overrides it when set.
///
/// A `RUST_LOG` that is not a filter does not leave the daemon without logs: the
/// configured `level` is used, and the first line logged says what was ignored.
pub fn init_logging(level: &str, output: LogOutput) -> Result<(), TelemetryError> {
    let (filter, ignored) = usable_log_filter(level, std::env::var("RUST_LOG").ok().as_deref());
    let sub = log_subscriber(&filter, output, std::io::stderr)?;
    tracing::subscriber::set_global_default(sub).map_err(|e| TelemetryError::LogInit(e.to_string()))?;
    if let Some(e) = ignored {
        tracing::warn!(error = %e, log_level = level, "RUST_LOG ignored: not a log filter; logging at log_level");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusRecorder;
    use std::collections::HashSet;

    fn recorder() -> PrometheusRecorder {
        builder().build_recorder()
    }

    /// Records every metric once (and every labelled series), returns the render.
    fn render_all() -> String {
        let rec = recorder();
        metrics::with_local_recorder(&rec, || {
            describe_all();
            set_build_info();
            let t = TenantMetrics::new("acme");
            t.leads_received.increment(3);
            t.leads_dispatched.increment(2);
            t.topups_requested.increment(1);
            t.leads_rejected.get("phone_unverified").increment(1);
            t.offers_dispatched.get("auto_buy").increment(4);
            t.offer_transitions.get("opened").increment(1);
            t.responses_refused.get("lead_full").increment(1);
            t.credits_moved.get("charged").increment(120);
            t.observe_fairness([(0.3, 0.25), (0.2, 0.25), (0.0, 0.0)]);
            let m = Metrics::new();
            m.shards_alive.set(4.0);
            m.mailbox_depth_max.set(17.0);
            m.clock_behind.set(0.0);
            m.overload_refusals.get("mailbox_full").increment(1);
            m.connections.get("stream").increment(1.0);
            m.frames_received.get("json").increment(10);
            m.frames_sent.get("msgpack").increment(10);
            m.auth_failures.get("invalid_token").increment(1);
            m.config_reloads.get("ok").increment(1);
            m.slow_subscriber_disconnects.increment(1);
            m.stream_resumes.get("replayed").increment(1);
            m.decide_duration.record(1.5e-6);
            m.ingest_to_durable.record(4e-4);
            m.ingest_to_delivery.record(9e-4);
            m.wal.observe(&WalStatsLike {
                bytes_written: 4096,
                records: 64,
                batches: 2,
                syncs: 2,
                segments_live: 1,
                durable_seq: 64,
                ..Default::default()
            });
            use crate::wal::WalObserver;
            m.wal.batch(32);
            m.wal.synced(std::time::Duration::from_micros(250));
            m.wal.snapshot_duration.record(0.02);
            m.wal.snapshot_failures.increment(1);
            m.wal.record_recovery(std::time::Duration::from_millis(12), 1000);
            refresh_process_metrics();
        });
        rec.handle().render()
    }

    #[test]
    fn names_are_unique_prefixed_and_suffixed_by_kind() {
        let mut seen = HashSet::new();
        for d in ALL {
            assert!(seen.insert(d.name), "duplicate metric {}", d.name);
            assert!(d.name.starts_with("rota_") || d.name.starts_with("process_"), "{} lacks rota_", d.name);
            assert!(
                d.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                d.name
            );
            assert!(!d.help.is_empty(), "{} has no help", d.name);
            let base = d.name.strip_suffix("_total");
            match d.kind {
                Kind::Counter => assert!(base.is_some(), "counter {} must end in _total", d.name),
                _ => assert!(base.is_none(), "{} {} must not end in _total", d.kind.as_str(), d.name),
            }
            let stem = base.unwrap_or(d.name);
            for unit in ["seconds", "bytes", "ratio", "info"] {
                if d.unit == unit {
                    assert!(stem.ends_with(&format!("_{unit}")), "{} must end in _{unit}", d.name);
                }
            }
            for bad in ["_milliseconds", "_ms", "_micros", "_us", "_kb", "_percent"] {
                assert!(!stem.ends_with(bad), "{} is not in base units", d.name);
            }
            assert_eq!(d.buckets.is_some(), d.kind == Kind::Histogram, "{}: buckets iff histogram", d.name);
            if let Some(b) = d.buckets {
                assert!(b.windows(2).all(|w| w[0] < w[1]), "{} buckets must increase", d.name);
            }
            for l in d.labels {
                for banned in ["pro", "lead", "zone", "client", "id", "pro_id", "lead_id", "zone_id"] {
                    assert_ne!(*l, banned, "{} has an unbounded label", d.name);
                }
            }
        }
    }

    #[test]
    fn docs_describe_every_metric() {
        let doc = include_str!("../docs/OBSERVABILITY.md");
        for d in ALL {
            let row = format!("| `{}` | {} |", d.name, d.kind.as_str());
            assert!(doc.contains(&row), "docs/OBSERVABILITY.md lacks the row of {}", d.name);
        }
    }

    #[test]
    fn decide_and_pipeline_buckets_cover_the_targets() {
        assert_eq!(DECIDE_BUCKETS.first(), Some(&1e-6));
        assert_eq!(DECIDE_BUCKETS.last(), Some(&1e-2));
        assert_eq!(PIPELINE_BUCKETS.first(), Some(&5e-5));
        assert_eq!(PIPELINE_BUCKETS.last(), Some(&1.0));
        assert!(PIPELINE_BUCKETS.contains(&3e-3), "the 3 ms p99 target must be a bucket bound");
    }

    #[test]
    fn render_has_every_name_with_type_help_and_buckets() {
        let text = render_all();
        for d in ALL {
            if d.name.starts_with("process_") && !cfg!(target_os = "linux") {
                continue;
            }
            assert!(
                text.contains(&format!("# TYPE {} {}\n", d.name, d.kind.as_str())),
                "no TYPE for {}",
                d.name
            );
            assert!(text.contains(&format!("# HELP {} ", d.name)), "no HELP for {}", d.name);
            if let Some(b) = d.buckets {
                let le = format!("{}_bucket{{", d.name);
                let lines = text.lines().filter(|l| l.starts_with(&le)).count();
                assert!(lines > b.len(), "{}: {lines} bucket lines for {} bounds (+Inf)", d.name, b.len());
                assert!(text.contains(&format!("{}_count", d.name)), "{} has no _count", d.name);
                assert!(text.contains(&format!("{}_sum", d.name)), "{} has no _sum", d.name);
            }
        }
        assert!(!text.contains("quantile="), "summaries must not be rendered:\n{text}");
        assert!(text.contains("rota_leads_received_total{tenant=\"acme\"} 3"), "{text}");
        assert!(
            text.contains("rota_credits_moved_total{tenant=\"acme\",movement=\"charged\"} 120"),
            "{text}"
        );
        assert!(text.contains(&format!("rota_build_info{{version=\"{VERSION}\",git_sha=\"{GIT_SHA}\"}} 1")));
        // Series of unused bounded values exist at zero from the first scrape.
        assert!(text.contains("rota_offers_dispatched_total{tenant=\"acme\",kind=\"contact\"} 0"), "{text}");
        assert!(text.contains("rota_wal_sync_duration_seconds_bucket{le=\"0.0003\"} 1"), "{text}");
        assert!(text.contains("rota_decide_duration_seconds_bucket{le=\"0.000002\"} 1"), "{text}");
    }

    #[test]
    fn unknown_label_values_fold_into_other() {
        let rec = recorder();
        metrics::with_local_recorder(&rec, || {
            let t = TenantMetrics::new("acme");
            t.leads_rejected.get("pro-8812").increment(1);
            t.leads_rejected.get("competitor").increment(2);
        });
        let text = rec.handle().render();
        assert!(text.contains("rota_leads_rejected_total{tenant=\"acme\",reason=\"other\"} 1"), "{text}");
        assert!(
            text.contains("rota_leads_rejected_total{tenant=\"acme\",reason=\"competitor\"} 2"),
            "{text}"
        );
        assert!(!text.contains("pro-8812"));
    }

    #[test]
    fn wal_observe_is_idempotent_for_counters_and_histograms_count_every_sync() {
        use crate::wal::WalObserver;
        let rec = recorder();
        let stats = WalStatsLike { records: 10, batches: 3, syncs: 3, ..Default::default() };
        metrics::with_local_recorder(&rec, || {
            let w = WalMetrics::new();
            w.observe(&stats);
            w.observe(&stats);
            // What the writer reports as it goes: every sync, not one per sample.
            for (records, micros) in [(2, 200), (3, 300), (5, 7_000)] {
                w.batch(records);
                w.synced(std::time::Duration::from_micros(micros));
            }
            w.observe(&WalStatsLike { failed: true, ..stats });
        });
        let text = rec.handle().render();
        assert!(text.contains("rota_wal_records_total 10\n"), "{text}");
        assert!(text.contains("rota_wal_sync_duration_seconds_count 3\n"), "{text}");
        assert!(text.contains("rota_wal_sync_duration_seconds_bucket{le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("rota_wal_batch_records_sum 10\n"), "{text}");
        assert!(text.contains("rota_wal_failed 1\n"), "{text}");
    }

    #[test]
    fn fairness_reports_the_largest_relative_deviation() {
        let rec = recorder();
        metrics::with_local_recorder(&rec, || {
            TenantMetrics::new("acme").observe_fairness([(0.5, 0.25), (0.25, 0.25), (0.25, 0.5)]);
        });
        let text = rec.handle().render();
        assert!(text.contains("rota_fairness_max_share_deviation_ratio{tenant=\"acme\"} 1\n"), "{text}");
        assert!(text.contains("rota_fairness_share_deviation_ratio_count{tenant=\"acme\"} 3\n"), "{text}");
    }

    /// A window with nothing to judge leaves no figure (NaN), not the last busy
    /// window's nor a perfect 0.
    #[test]
    fn fairness_of_a_window_with_nothing_judged_is_no_figure() {
        let rec = recorder();
        metrics::with_local_recorder(&rec, || {
            let t = TenantMetrics::new("acme");
            t.observe_fairness([(0.5, 0.25)]);
            t.observe_fairness([]);
        });
        let text = rec.handle().render();
        assert!(text.contains("rota_fairness_max_share_deviation_ratio{tenant=\"acme\"} NaN\n"), "{text}");
    }

    #[test]
    fn rust_log_overrides_the_configured_level() {
        assert_eq!(log_filter("info", None), "info");
        assert_eq!(log_filter("info", Some("")), "info");
        assert_eq!(log_filter("info", Some("rota=debug")), "rota=debug");
        assert!(matches!(env_filter("info,[["), Err(TelemetryError::LogFilter { .. })));
        // A RUST_LOG that is not a filter falls back to the configured level.
        let (f, ignored) = usable_log_filter("warn", Some("rota=verbose"));
        assert_eq!(f, "warn");
        assert!(matches!(ignored, Some(TelemetryError::LogFilter { .. })));
        let (f, ignored) = usable_log_filter("warn", Some("rota=debug"));
        assert_eq!(f, "rota=debug", "a valid RUST_LOG wins");
        assert!(ignored.is_none());
    }

    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_logs_put_stable_fields_at_the_top_level() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = log_subscriber("info", LogOutput::Json, move || w.clone()).unwrap();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(tenant = "acme", lead_id = "L1", code = "lead_full", "response refused");
            tracing::debug!(tenant = "acme", "filtered out");
        });
        let out = String::from_utf8(buf.0.lock().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["lead_id"], "L1");
        assert_eq!(v["code"], "lead_full");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "response refused");
    }
}
