#!/usr/bin/env bash
# Baseline: the rotation-and-budget decision as a PostgreSQL function
# (postgres_dispatch.sql) on a fresh cluster with `synchronous_commit = on` and
# `fsync = on` (every commit synced before the reply, as rota's `fsync = "always"`),
# driven by pgbench on the same machine. Needs PostgreSQL 15 server binaries (Debian:
# postgresql-15, which has pgbench). Run as root, the server runs as the `postgres` user.
# Prints pgbench's summary, then an audit of the money.
#
#   loadtest/baselines/postgres.sh
#   CLIENTS=64 SECONDS_=30 loadtest/baselines/postgres.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SHARDS=${SHARDS:-50}
PROS=${PROS:-20}
CLIENTS=${CLIENTS:-32}
SECONDS_=${SECONDS_:-20}
PORT=${PORT:-5499}
BUDGET=1000000000000
bin=${PG_BIN:-/usr/lib/postgresql/15/bin}

dir=$(mktemp -d /tmp/rota-pg-baseline.XXXXXX)
chmod 755 "$dir"
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$dir"
cleanup() { as_pg "$bin/pg_ctl -D $dir/data stop -m immediate" >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
as_pg "$bin/initdb -D $dir/data -A trust -U postgres" >/dev/null
as_pg "$bin/pg_ctl -D $dir/data -l $dir/log -w start -o \"-p $PORT -k $dir -c listen_addresses='' \
  -c synchronous_commit=on -c fsync=on -c shared_buffers=512MB -c max_connections=200\"" >/dev/null
psql=(psql -q -X -h "$dir" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
"${psql[@]}" -v shards="$SHARDS" -v pros="$PROS" -v budget="$BUDGET" -f "$here/postgres_dispatch.sql"

echo "postgres $("$bin/postgres" --version | awk '{print $3}'), synchronous_commit on," \
  "$SHARDS shards x $PROS pros, groups of 4, $CLIENTS clients, ${SECONDS_} s"
pgbench -h "$dir" -p "$PORT" -U postgres -n -M prepared -c "$CLIENTS" -j 2 -T "$SECONDS_" \
  -D shards="$SHARDS" -f "$here/pgbench_dispatch.sql" postgres
"${psql[@]}" -At -c "SELECT 'leads ' || (SELECT count(*) FROM leads) ||
  ' offers ' || (SELECT count(*) FROM offers) ||
  ' budget spent ' || (SELECT sum($BUDGET - budget) FROM pros) ||
  ' price x offers ' || (SELECT coalesce(sum(price), 0) FROM offers)"
