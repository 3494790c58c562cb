#!/usr/bin/env python3
"""Generates grafana/rota-dashboard.json (the committed file is the output).

Edit the panels here, then run `python3 grafana/dashboard.py` and commit both.
Every panel sets a unit; every query uses `$__rate_interval` for rates and
`tenant=~"$tenant"` where the metric carries a tenant, so
tests/observability/check.sh can evaluate them against a real Prometheus.
"""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
T = 'tenant=~"$tenant"'
RI = "$__rate_interval"

panels = []
_id = [0]
_y = [0]
_x = [0]
_row_h = [0]


def next_id():
    _id[0] += 1
    return _id[0]


def row(title):
    if _x[0] != 0:
        _y[0] += _row_h[0]
        _x[0] = 0
    panels.append({
        "type": "row", "id": next_id(), "title": title, "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y[0]}, "panels": [],
    })
    _y[0] += 1
    _row_h[0] = 0


def place(w, h):
    if _x[0] + w > 24:
        _y[0] += _row_h[0]
        _x[0] = 0
        _row_h[0] = 0
    pos = {"h": h, "w": w, "x": _x[0], "y": _y[0]}
    _x[0] += w
    _row_h[0] = max(_row_h[0], h)
    return pos


def targets(queries):
    out = []
    for i, (expr, legend) in enumerate(queries):
        out.append({
            "datasource": DS, "refId": chr(ord("A") + i), "expr": expr,
            "legendFormat": legend, "range": True,
        })
    return out


def ts(title, unit, queries, w=8, h=8, desc="", thresholds=None, stack=False, decimals=None):
    steps = [{"color": "green", "value": None}]
    for value, color in thresholds or []:
        steps.append({"color": color, "value": value})
    custom = {
        "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
        "showPoints": "never", "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "line" if thresholds else "off"},
    }
    defaults = {
        "unit": unit, "custom": custom,
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    panels.append({
        "type": "timeseries", "id": next_id(), "title": title, "description": desc,
        "datasource": DS, "gridPos": place(w, h),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets(queries),
    })


def stat(title, unit, queries, w=4, h=4, desc="", thresholds=None):
    steps = [{"color": "green", "value": None}]
    for value, color in thresholds or []:
        steps.append({"color": color, "value": value})
    panels.append({
        "type": "stat", "id": next_id(), "title": title, "description": desc,
        "datasource": DS, "gridPos": place(w, h),
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
        "targets": targets(queries),
    })


def q(quantile, metric, sel="", by=""):
    by_labels = "le" + (", " + by if by else "")
    return (f"histogram_quantile({quantile}, sum by ({by_labels}) "
            f"(rate({metric}_bucket{{{sel}}}[{RI}])))")


# --- Overview ---------------------------------------------------------------
row("Overview")
stat("Build", "none", [("max by (version, git_sha) (rota_build_info)", "{{version}} {{git_sha}}")], w=4,
     desc="Running version (rota_build_info).")
stat("Lead rate", "reqps", [(f"sum(rate(rota_leads_received_total{{{T}}}[{RI}]))", "leads/s")], w=4)
stat("Error ratio", "percentunit",
     [(f"(sum(rate(rota_leads_rejected_total{{{T}}}[{RI}])) + sum(rate(rota_overload_refusals_total[{RI}])))"
       f" / (sum(rate(rota_leads_received_total{{{T}}}[{RI}]))"
       f" + sum(rate(rota_overload_refusals_total{{reason!=\"mailbox_full\"}}[{RI}])))",
       "errors")], w=4, thresholds=[(0.01, "orange"), (0.05, "red")],
     desc="(quality-gate rejections + overload refusals) / (leads received + overload refusals refused "
          "before rota counted the lead: a mailbox_full refusal is counted as received already).")
stat("p99 publish-to-delivery", "s", [(q(0.99, "rota_ingest_to_delivery_seconds"), "p99")], w=4,
     thresholds=[(0.001, "orange"), (0.003, "red")], desc="Target: p99 under 3 ms at 20k leads/s.")
stat("Shards alive", "short", [("sum(rota_shards_alive)", "shards")], w=4)
stat("WAL failed", "bool_yes_no", [("max(rota_wal_failed)", "failed")], w=4, thresholds=[(1, "red")])
ts("Leads", "reqps", [
    (f"sum(rate(rota_leads_received_total{{{T}}}[{RI}]))", "received"),
    (f"sum(rate(rota_leads_dispatched_total{{{T}}}[{RI}]))", "dispatched"),
    (f"sum(rate(rota_leads_rejected_total{{{T}}}[{RI}]))", "rejected"),
    (f"sum(rate(rota_overload_refusals_total[{RI}]))", "refused (overload)"),
], w=8)
ts("Pipeline latency", "s", [
    (q(0.5, "rota_ingest_to_delivery_seconds"), "delivery p50"),
    (q(0.99, "rota_ingest_to_delivery_seconds"), "delivery p99"),
    (q(0.5, "rota_ingest_to_durable_seconds"), "durable p50"),
    (q(0.99, "rota_ingest_to_durable_seconds"), "durable p99"),
], w=8, thresholds=[(0.003, "red")], desc="From the publish frame read to durable (ack) and to delivery.")
ts("Error ratio", "percentunit", [
    (f"sum(rate(rota_leads_rejected_total{{{T}}}[{RI}])) / sum(rate(rota_leads_received_total{{{T}}}[{RI}]))",
     "rejected / received"),
    (f"sum(rate(rota_responses_refused_total{{{T}}}[{RI}])) / sum(rate(rota_offers_dispatched_total{{{T}}}[{RI}]))",
     "refused responses / offers"),
], w=8)

# --- Pipeline breakdown -----------------------------------------------------
row("Pipeline breakdown")
ts("Decide duration", "s", [
    (q(0.5, "rota_decide_duration_seconds"), "p50"),
    (q(0.99, "rota_decide_duration_seconds"), "p99"),
    (q(0.999, "rota_decide_duration_seconds"), "p99.9"),
], w=6, thresholds=[(0.00001, "red")], desc="Pure core decision per command. Target: p50 < 2 us, p99 < 10 us.")
ts("WAL sync duration", "s", [
    (q(0.5, "rota_wal_sync_duration_seconds"), "p50"),
    (q(0.99, "rota_wal_sync_duration_seconds"), "p99"),
], w=6)
ts("WAL batch size", "short", [
    (q(0.5, "rota_wal_batch_records"), "p50"),
    (q(0.99, "rota_wal_batch_records"), "p99"),
    (f"sum(rate(rota_wal_records_total[{RI}])) / sum(rate(rota_wal_batches_total[{RI}]))", "mean"),
], w=6, desc="Records per group commit.")
ts("Durable vs delivered", "s", [
    (q(0.99, "rota_ingest_to_durable_seconds"), "publish-to-durable p99"),
    (q(0.99, "rota_ingest_to_delivery_seconds"), "publish-to-delivery p99"),
], w=6, desc="The gap is stream fan-out after the sync.")

# --- Saturation -------------------------------------------------------------
row("Saturation")
ts("Shard mailbox depth (max)", "short", [("max(rota_mailbox_depth_max)", "deepest mailbox")], w=6)
ts("Wall clock behind rota's time", "s", [("max(rota_clock_behind_seconds)", "behind")], w=6,
   desc="Above 0 after a step back of the wall clock: rota's time holds until it catches up.")
ts("Overload refusals", "reqps",
   [(f"sum by (reason) (rate(rota_overload_refusals_total[{RI}]))", "{{reason}}")], w=6, stack=True)
ts("Connections", "short", [("sum by (scope) (rota_connections)", "{{scope}}")], w=6, stack=True)
ts("Frames", "pps", [
    (f"sum by (encoding) (rate(rota_frames_received_total[{RI}]))", "in {{encoding}}"),
    (f"sum by (encoding) (rate(rota_frames_sent_total[{RI}]))", "out {{encoding}}"),
], w=6)
ts("Stream trouble", "ops", [
    (f"sum(rate(rota_slow_subscriber_disconnects_total[{RI}]))", "slow-subscriber disconnects"),
    (f"sum by (outcome) (rate(rota_stream_resumes_total[{RI}]))", "resumes {{outcome}}"),
    (f"sum(rate(rota_stream_history_restarts_total[{RI}]))", "stream history restarts"),
    (f"sum by (reason) (rate(rota_auth_failures_total[{RI}]))", "auth failure {{reason}}"),
    (f"sum by (result) (increase(rota_config_reloads_total[{RI}]))", "config reload {{result}}"),
], w=6)
ts("Memory", "bytes", [
    ("sum(process_resident_memory_bytes{job=~\"rota.*\"})", "resident"),
    ("sum(process_virtual_memory_bytes{job=~\"rota.*\"})", "virtual"),
], w=6)
ts("File descriptors", "percentunit", [
    ("sum(process_open_fds{job=~\"rota.*\"}) / sum(process_max_fds{job=~\"rota.*\"})", "open / max"),
], w=6, thresholds=[(0.8, "red")])
ts("Threads", "short", [("sum(process_threads{job=~\"rota.*\"})", "threads")], w=6)
ts("Pros parked out of the rotation", "short", [("sum by (tenant, reason) (rota_pros_parked)", "{{tenant}} {{reason}}")], w=6,
   desc="Pros not scanned per lead: reason budget = every auto-buy budget spent (back with a recharge or refund); unavailable = paused, on vacation, outside the schedule.")
ts("Stream history on disk", "bytes", [("sum by (tenant) (rota_stream_history_bytes)", "{{tenant}}")], w=6,
   desc="Events evicted from the replay buffer, kept for resumes (stream_spill_bytes per tenant).")
ts("Shards per tenant", "short", [("max by (tenant) (rota_tenant_shards)", "{{tenant}}")], w=6,
   desc="Zone x category shards of each tenant.")
ts("Shards used per tenant", "percentunit", [("max by (tenant) (rota_tenant_shards_used_ratio)", "{{tenant}}")], w=6,
   thresholds=[(0.9, "red")],
   desc="Zone x category shards over max_shards_per_tenant; at 100 % new pairs are refused shard_limit.")

# --- Durability -------------------------------------------------------------
row("Durability")
ts("WAL throughput", "Bps", [(f"sum(rate(rota_wal_written_bytes_total[{RI}]))", "bytes/s")], w=6)
ts("WAL records and syncs", "ops", [
    (f"sum(rate(rota_wal_records_total[{RI}]))", "records/s"),
    (f"sum(rate(rota_wal_batches_total[{RI}]))", "batches/s"),
    (f"sum(rate(rota_wal_syncs_total[{RI}]))", "syncs/s"),
    (f"sum(rate(rota_wal_sync_interval_waits_total[{RI}]))", "batches held for min_sync_interval/s"),
], w=6)
ts("WAL sync failures", "short", [
    (f"sum(increase(rota_wal_sync_failures_total[{RI}]))", "failures"),
    ("max(rota_wal_failed)", "failed (1 = refusing)"),
], w=6, thresholds=[(1, "red")])
ts("WAL segments and durable sequence", "short", [
    ("sum(rota_wal_segments_live)", "segments live"),
    (f"sum(increase(rota_wal_segments_reused_total[{RI}]))", "segments reused (not zero-filled)"),
    (f"sum(increase(rota_wal_spare_failures_total[{RI}]))", "next segment not prepared ahead (failed attempts)"),
    (f"sum(deriv(rota_wal_durable_sequence[{RI}]))", "durable seq / s"),
], w=6)
ts("Snapshot duration and pause", "s", [
    (q(0.5, "rota_snapshot_duration_seconds"), "duration p50"),
    (q(0.99, "rota_snapshot_duration_seconds"), "duration p99"),
    (q(0.99, "rota_snapshot_pause_seconds"), "pause p99 (decisions held back)"),
], w=8)
ts("Snapshots written", "short", [
    (f"sum(increase(rota_wal_snapshots_total[{RI}]))", "snapshots"),
    (f"sum(increase(rota_snapshot_failures_total[{RI}]))", "failed"),
], w=8, thresholds=[(1, "red")])
stat("Last recovery duration", "s", [("max(rota_recovery_duration_seconds)", "recovery")], w=4, h=8)
stat("Last recovery records replayed", "short", [("max(rota_recovery_replayed_records)", "records")], w=4, h=8)

# --- Business ---------------------------------------------------------------
row("Business")
ts("Leads by outcome", "reqps", [
    (f"sum by (tenant) (rate(rota_leads_dispatched_total{{{T}}}[{RI}]))", "dispatched {{tenant}}"),
    (f"sum by (reason) (rate(rota_leads_rejected_total{{{T}}}[{RI}]))", "rejected {{reason}}"),
], w=8, stack=True)
ts("Offers by kind", "ops",
   [(f"sum by (kind) (rate(rota_offers_dispatched_total{{{T}}}[{RI}]))", "{{kind}}")], w=8, stack=True)
ts("Offer status changes", "ops",
   [(f"sum by (status) (rate(rota_offer_transitions_total{{{T}}}[{RI}]))", "{{status}}")], w=8, stack=True)
ts("Refused responses", "ops",
   [(f"sum by (code) (rate(rota_responses_refused_total{{{T}}}[{RI}]))", "{{code}}")], w=8, stack=True)
ts("Credits by movement", "short",
   [(f"sum by (movement) (rate(rota_credits_moved_total{{{T}}}[{RI}]))", "{{movement}}")], w=8,
   desc="Credits per second moved by the ledger.")
ts("Top-ups requested", "ops",
   [(f"sum by (tenant) (rate(rota_topups_requested_total{{{T}}}[{RI}]))", "{{tenant}}")], w=8)
ts("Settlements the ledger refused", "short",
   [(f"sum by (op) (increase(rota_ledger_settle_failures_total[{RI}]))", "{{op}}")], w=8,
   desc="Captures, releases and refunds decided and refused by the ledger: always 0 (a bug otherwise, alert RotaLedgerSettleFailed).")
ts("Fairness: max share deviation", "percentunit",
   [(f"max by (tenant) (rota_fairness_max_share_deviation_ratio{{{T}}})", "{{tenant}}")], w=12,
   desc="Largest |offered share - entitled share| / entitled share of any pro at the last evaluation.")
ts("Fairness: share deviation percentiles", "percentunit", [
    (q(0.5, "rota_fairness_share_deviation_ratio", T), "p50"),
    (q(0.9, "rota_fairness_share_deviation_ratio", T), "p90"),
    (q(0.99, "rota_fairness_share_deviation_ratio", T), "p99"),
], w=12)

dashboard = {
    "uid": "rota-overview",
    "title": "rota",
    "description": "rota lead dispatch daemon: traffic, latency, saturation, durability, business.",
    "tags": ["rota"],
    "timezone": "browser",
    "editable": True,
    "graphTooltip": 1,
    "refresh": "10s",
    "schemaVersion": 39,
    "version": 1,
    "time": {"from": "now-1h", "to": "now"},
    "annotations": {"list": []},
    "links": [],
    "templating": {"list": [
        {
            "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
        },
        {
            "name": "tenant", "label": "Tenant", "type": "query", "datasource": DS,
            "definition": "label_values(rota_leads_received_total, tenant)",
            "query": {"query": "label_values(rota_leads_received_total, tenant)", "refId": "tenant"},
            "includeAll": True, "multi": True, "allValue": ".*", "current": {},
            "refresh": 2, "sort": 1, "hide": 0, "regex": "", "options": [],
        },
    ]},
    "panels": panels,
}

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rota-dashboard.json")
    with open(out, "w") as f:
        json.dump(dashboard, f, indent=2)
        f.write("\n")
    print(f"wrote {out}: {sum(1 for p in panels if p['type'] != 'row')} panels")
