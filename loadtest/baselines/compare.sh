#!/usr/bin/env bash
# rota against the same decision in Redis and PostgreSQL, on this machine, in one run:
# Redis 7 Lua (appendfsync always; one request in flight per client, then 16),
# PostgreSQL 15 (synchronous commit), and rota end to end over websockets
# (fsync = "always"), each with its load generator on the same cores. See
# BENCHMARKS.md, "Against Redis and PostgreSQL".
#
#   cargo build --release --workspace --bins
#   loadtest/baselines/compare.sh            # ROUNDS=2 by default
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ROUNDS=${ROUNDS:-2}
TRACE=${TRACE:-/tmp/rota-compare-t20.msgpack}
# Leads only (no responses, declines or replies): the same requests as the baselines.
LEADS_TRACE=${LEADS_TRACE:-/tmp/rota-compare-leads.msgpack}
# Not ROTA_PORT: every ROTA_* variable is a setting of the daemon this script starts.
PORT=${COMPARE_PORT:-7790}
rota="$root/target/release/rota"
lt="$root/target/release/rota-loadtest"
for b in "$rota" "$lt"; do
  [ -x "$b" ] || { echo "build first: cargo build --release --workspace --bins ($b missing)" >&2; exit 1; }
done
[ -f "$TRACE" ] || "$lt" gen --seed 2 --leads 400000 --lead-rate 20000 --out "$TRACE" >/dev/null
[ -f "$LEADS_TRACE" ] || "$lt" gen --seed 2 --leads 400000 --lead-rate 20000 --respond-share 0 \
  --decline-share 0 --out "$LEADS_TRACE" >/dev/null

rota_run() { # $1 = offered leads/s, $2 = trace
  local data pid
  data=$(mktemp -d /tmp/rota-compare-data.XXXXXX)
  "$rota" serve --listen "127.0.0.1:$PORT" --data-dir "$data" --set 'log_level="warn"' 2>/dev/null &
  pid=$!
  for _ in $(seq 1 100); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  "$lt" replay --url "ws://127.0.0.1:$PORT" --trace "$2" --rate "$1" --duration 10s --drain 3s \
    --no-progress --json-out "$data/run.json" >/dev/null 2>&1 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$data/run.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
d = j["duration_s"]
print("leads acknowledged %.0f/s of %.0f/s offered; other requests %.0f/s; ack p50 %.2f p99 %.2f ms; "
      "delivery p50 %.2f p99 %.2f ms; errors %s; exactly-once violations %d; host busy %.2f of 2 cores (tool %.2f)"
      % (j["achieved_leads_per_s"], j["target_leads_per_s"],
         j["other_replies"]["count"] / d, j["ack_ok"]["p50"], j["ack_ok"]["p99"],
         j["delivery"]["p50"], j["delivery"]["p99"], j["errors_by_code"],
         sum(v for k, v in j["violations"].items() if isinstance(v, int)),
         j["host"]["busy_cores"], j["host"]["tool_cores"]))
PY
  rm -rf "$data"
}

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: redis, 50 clients, 1 in flight each"
  REQUESTS=200000 "$here/redis.sh" | tail -2
  echo "== round $r: redis, 50 clients, 16 in flight each"
  PIPELINE=16 REQUESTS=300000 "$here/redis.sh" | tail -2
  echo "== round $r: postgres, 32 clients"
  SECONDS_=15 "$here/postgres.sh" | grep -E 'tps|latency average|^leads'
  echo "== round $r: rota, leads only, 50,000 leads/s offered for 10 s"
  rota_run 50000 "$LEADS_TRACE"
  echo "== round $r: rota, leads only, 20,000 leads/s offered for 10 s"
  rota_run 20000 "$LEADS_TRACE"
  echo "== round $r: rota, full trace (a response or decline for about every lead), 50,000 leads/s offered"
  rota_run 50000 "$TRACE"
done
