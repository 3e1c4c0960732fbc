#!/usr/bin/env bash
# Measures CPU time per pgbench transaction of skiff and PgBouncer: reads
# each pooler's user + system clock ticks from /proc/PID/stat before and
# after a fixed number of `pgbench -S` transactions, and prints ticks per
# 10,000 transactions. Pooler and pgbench take turns for ROUNDS rounds.
#
# Usage: benches/pg_cpu.sh [SKIFF_BINARY] [TRANSACTIONS_PER_CLIENT] [ROUNDS]
# Environment: CLIENTS (default 50), MODE (simple or prepared, default
# simple).
# Needs root (PostgreSQL and PgBouncer run as the postgres user), Debian's
# pgbouncer and postgresql-15. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

SKIFF=${1:-target/release/skiff}
PER_CLIENT=${2:-400}
ROUNDS=${3:-3}
CLIENTS=${CLIENTS:-50}
MODE=${MODE:-simple}
POOL_SIZE=20
WORK=$(mktemp -d /tmp/skiff-cpu-XXXXXX)
chown postgres:postgres "$WORK"
TICKS_PER_SECOND=$(getconf CLK_TCK)
. benches/pg_env.sh
PG_PORT=$(free_port); BOUNCER_PORT=$(free_port); SKIFF_PORT=$(free_port); ADMIN_PORT=$(free_port)

trap cleanup EXIT
start_postgres
start_pgbouncer

start_skiff "$SKIFF"

# Prints the user + system clock ticks of a process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Prints "ticks tps" for one pgbench run against a pooler.
measure() {
    local port=$1 pid=$2 before after out tps
    before=$(ticks "$pid")
    out=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -S -n -c "$CLIENTS" -j 2 \
        -t "$PER_CLIENT" -M "$MODE" bench 2>&1)
    after=$(ticks "$pid")
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
    echo "$((after - before)) ${tps:-0}"
}

# Warm both poolers so every server connection is open.
measure "$BOUNCER_PORT" "$BOUNCER_PID" >/dev/null
measure "$SKIFF_PORT" "$SKIFF_PID" >/dev/null

TOTAL=$((PER_CLIENT * CLIENTS))
echo "pgbench -S -M $MODE -c $CLIENTS -j 2, $TOTAL transactions per run, $TICKS_PER_SECOND ticks/s"
printf "%-6s %-10s %8s %12s %10s\n" round pooler ticks "per 10k tx" tps
for round in $(seq "$ROUNDS"); do
    for pooler in pgbouncer skiff; do
        if [ "$pooler" = skiff ]; then
            read -r used tps < <(measure "$SKIFF_PORT" "$SKIFF_PID")
        else
            read -r used tps < <(measure "$BOUNCER_PORT" "$BOUNCER_PID")
        fi
        per=$(python3 -c "print(f'{$used * 10000 / $TOTAL:.1f}')")
        printf "%-6s %-10s %8s %12s %10s\n" "$round" "$pooler" "$used" "$per" "$tps"
    done
done
