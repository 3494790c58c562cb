#!/usr/bin/env bash
# Baseline: the rotation-and-budget decision as a Redis Lua script (redis_dispatch.lua)
# on a fresh redis-server with `appendonly yes` and `appendfsync always` (every write
# synced before the reply, as rota's `fsync = "always"`), driven by redis-benchmark on
# the same machine. Needs redis-server and redis-benchmark (Debian: redis-server,
# redis-tools). Prints redis-benchmark's CSV line, then an audit of the money.
#
#   loadtest/baselines/redis.sh                 # 50 clients, one request at a time each
#   PIPELINE=16 loadtest/baselines/redis.sh     # 16 requests in flight per client
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SHARDS=${SHARDS:-50}          # (tenant, zone, category) shards
PROS=${PROS:-20}              # pros per shard
GROUP=${GROUP:-4}             # buyers per lead (R21 group_size)
PRICE=${PRICE:-10}            # credits per lead
REQUESTS=${REQUESTS:-300000}  # leads published
CLIENTS=${CLIENTS:-50}
PIPELINE=${PIPELINE:-1}
PORT=${PORT:-6399}
BUDGET=1000000000000          # never runs out: every lead finds its group

dir=$(mktemp -d /tmp/rota-redis-baseline.XXXXXX)
cli() { redis-cli -p "$PORT" "$@"; }
cleanup() { cli shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync always \
  --save '' --daemonize yes --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
for _ in $(seq 1 100); do cli ping >/dev/null 2>&1 && break; sleep 0.1; done

# Pros: equal weights (stride 1000), passes 1..PROS so the rotation starts at p1.
cli EVAL "for s = 0, tonumber(ARGV[1]) - 1 do
  for p = 1, tonumber(ARGV[2]) do
    redis.call('ZADD', 'ring:' .. s, p, 'p' .. p)
    redis.call('HSET', 'budget:' .. s, 'p' .. p, ARGV[3])
    redis.call('HSET', 'stride:' .. s, 'p' .. p, 1000)
  end
end" 0 "$SHARDS" "$PROS" "$BUDGET" >/dev/null
sha=$(cli SCRIPT LOAD "$(cat "$here/redis_dispatch.lua")")

echo "redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'), appendfsync always," \
  "$SHARDS shards x $PROS pros, groups of $GROUP, $REQUESTS leads, $CLIENTS clients, pipeline $PIPELINE"
redis-benchmark -p "$PORT" -n "$REQUESTS" -c "$CLIENTS" -P "$PIPELINE" -r 1000000000 --csv \
  EVALSHA "$sha" 0 __rand_int__ "$SHARDS" "$PRICE" "$GROUP"

# Audit: every lead got its group, and the budgets lost exactly price x offers.
cli EVAL "local leads = redis.call('HLEN', 'leads')
local offers = redis.call('XLEN', 'offers')
local spent = 0
local bought = 0
for s = 0, tonumber(ARGV[1]) - 1 do
  local b = redis.call('HGETALL', 'budget:' .. s)
  for i = 2, #b, 2 do spent = spent + (tonumber(ARGV[3]) - tonumber(b[i])) end
end
for _, e in ipairs(redis.call('XRANGE', 'offers', '-', '+')) do
  local f = e[2]
  for i = 1, #f, 2 do
    if f[i] == 'pros' and f[i + 1] ~= '' then
      local _, commas = string.gsub(f[i + 1], ',', '')
      bought = bought + commas + 1
    end
  end
end
return {'leads', leads, 'stream entries', offers, 'offers', bought, 'budget spent', spent,
  'price x offers', bought * tonumber(ARGV[2])}" 0 "$SHARDS" "$PRICE" "$BUDGET" | paste -sd' '
