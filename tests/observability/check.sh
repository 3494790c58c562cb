#!/usr/bin/env bash
# Checks rota's alert rules, metrics exposition and Grafana dashboard with the real
# Prometheus tools. Installs nothing: needs `promtool` (static, live), `prometheus`
# (live) and `python3` on PATH (Debian: `apt-get install prometheus`).
#
# Usage:
#   check.sh static <metrics-file | metrics-url>
#       promtool check rules grafana/alerts.yml
#       promtool test rules grafana/alerts_test.yml
#       promtool check metrics on the file, or on what the URL serves
#       (e.g. http://127.0.0.1:7701/metrics). A file with every metric:
#       cargo test --test observability_metrics -- --ignored dump_metrics
#       -> target/observability/metrics.prom
#
#   check.sh live <admin-url>
#       Everything `static` does against <admin-url>/metrics, then starts a
#       Prometheus on 127.0.0.1:<free port> (temporary config scraping
#       <admin-url>/metrics every 1s as job "rota", loading grafana/alerts.yml, TSDB
#       in a temp dir), waits for samples, and evaluates through /api/v1/query:
#         - every panel query of grafana/rota-dashboard.json ($tenant -> ".*",
#           $__rate_interval -> 1m, $__interval -> 15s): must parse and return data;
#         - every alert expression of grafana/alerts.yml: must parse.
#       <admin-url> is the daemon's admin listener, e.g. http://127.0.0.1:7701; drive
#       some traffic through the daemon first so rates and histograms have data.
#
# Output: one line per check (`PASS ...` / `FAIL ...`), then `N passed, M failed`.
# Exit status: 0 when everything passed, 1 when a check failed, 2 on usage or
# missing tools.
#
# Environment: PROM_WAIT_S (default 60) bounds the wait for samples in live mode.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
grafana="$root/grafana"
passed=0
failed=0

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 2
}

need() {
    for tool in "$@"; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "check.sh: $tool not found on PATH (Debian: apt-get install prometheus)" >&2
            exit 2
        fi
    done
}

result() { # result <ok 0|1> <line> [details]
    if [ "$1" = 0 ]; then
        passed=$((passed + 1))
        echo "PASS $2"
    else
        failed=$((failed + 1))
        echo "FAIL $2"
        if [ -n "${3:-}" ]; then
            printf '%s\n' "$3" | sed 's/^/     /'
        fi
    fi
}

run_check() { # run_check <label> <command...>
    local label="$1" out rc=0
    shift
    out="$("$@" 2>&1)" || rc=$?
    result "$rc" "$label" "$([ "$rc" = 0 ] || printf '%s' "$out")"
}

fetch_metrics() { # fetch_metrics <file|url> <dest>
    case "$1" in
        http://* | https://*)
            python3 - "$1" "$2" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    if r.status != 200:
        sys.exit(f"GET {sys.argv[1]}: {r.status}")
    open(sys.argv[2], "wb").write(r.read())
PY
            ;;
        *)
            [ -f "$1" ] || { echo "check.sh: no such metrics file: $1" >&2; exit 2; }
            cp "$1" "$2"
            ;;
    esac
}

static_checks() { # static_checks <file|url>
    need promtool python3
    run_check "promtool check rules grafana/alerts.yml" promtool check rules "$grafana/alerts.yml"
    run_check "promtool test rules grafana/alerts_test.yml" \
        bash -c "cd '$grafana' && promtool test rules alerts_test.yml"
    local m="$tmp/metrics.prom"
    if fetch_metrics "$1" "$m"; then
        run_check "promtool check metrics $1" bash -c "promtool check metrics < '$m'"
        # promtool only lints; also require the build info and no summaries.
        run_check "rota_build_info present in $1" grep -q '^rota_build_info{' "$m"
        run_check "no summaries (quantile=) in $1" bash -c "! grep -q 'quantile=' '$m'"
    else
        result 1 "fetch metrics from $1"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

live_checks() { # live_checks <admin-url>
    need promtool prometheus python3
    local admin="${1%/}"
    static_checks "$admin/metrics"

    local hostport="${admin#*://}"
    hostport="${hostport%%/*}"
    local scheme="${admin%%://*}"
    local port
    port="$(free_port)"
    cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $grafana/alerts.yml
scrape_configs:
  - job_name: rota
    scheme: $scheme
    metrics_path: /metrics
    static_configs:
      - targets: ['$hostport']
EOF
    prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
        --web.listen-address="127.0.0.1:$port" >"$tmp/prometheus.log" 2>&1 &
    prom_pid=$!

    local rc=0
    python3 "$here/live_queries.py" "http://127.0.0.1:$port" "$grafana/rota-dashboard.json" "$grafana/alerts.yml" \
        "${PROM_WAIT_S:-60}" "$prom_pid" >"$tmp/live.out" || rc=$?
    cat "$tmp/live.out"
    passed=$((passed + $(grep -c '^PASS' "$tmp/live.out" || true)))
    failed=$((failed + $(grep -c '^FAIL' "$tmp/live.out" || true)))
    if [ "$rc" != 0 ] && ! grep -q '^FAIL' "$tmp/live.out"; then
        result 1 "live evaluation" "$(tail -20 "$tmp/prometheus.log")"
    fi
}

[ $# -eq 2 ] || usage
tmp="$(mktemp -d)"
prom_pid=""
cleanup() {
    if [ -n "$prom_pid" ]; then
        kill "$prom_pid" 2>/dev/null || true
        wait "$prom_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

case "$1" in
    static) static_checks "$2" ;;
    live) live_checks "$2" ;;
    *) usage ;;
esac

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
