#!/usr/bin/env bash
# Measures CPU time per pgbench transaction of skiff and PgBouncer: reads
# each pooler's user + system clock ticks from /proc/PID/stat before and
# after a fixed number of `pgbench -S` transactions, and prints ticks per
# 10,000 transactions. Pooler and pgbench take turns for ROUNDS rounds.
# The same run also prints the CPU that pgbench itself and the PostgreSQL
# processes spend per transaction, in microseconds: a pooler changes
# those too, for example by how many replies pgbench finds ready per
# poll.
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

# Prints the clock ticks of every PostgreSQL process. The pooled backends
# live through a run, so the difference covers them.
postgres_ticks() {
    local total=0 pid
    for pid in $(pgrep -u postgres -x postgres); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# Prints "ticks tps pgbench_ticks postgres_ticks" for one pgbench run
# against a pooler. pgbench's ticks are read from the times of the shell
# that ran it, which count a child once it has exited.
measure() {
    local port=$1 pid=$2 before after out tps pg_before pg_after
    before=$(ticks "$pid")
    pg_before=$(postgres_ticks)
    out=$(bash -c 'pgbench "$@" 2>&1; awk "{print \$16 + \$17}" /proc/$$/stat' _ \
        -h 127.0.0.1 -p "$port" -U postgres -S -n -c "$CLIENTS" -j 2 \
        -t "$PER_CLIENT" -M "$MODE" bench)
    pg_after=$(postgres_ticks)
    after=$(ticks "$pid")
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
    echo "$((after - before)) ${tps:-0} $(echo "$out" | tail -1) $((pg_after - pg_before))"
}

# Warm both poolers so every server connection is open.
measure "$BOUNCER_PORT" "$BOUNCER_PID" >/dev/null
measure "$SKIFF_PORT" "$SKIFF_PID" >/dev/null

TOTAL=$((PER_CLIENT * CLIENTS))
echo "pgbench -S -M $MODE -c $CLIENTS -j 2, $TOTAL transactions per run, $TICKS_PER_SECOND ticks/s"
printf "%-6s %-10s %8s %12s %10s %14s %15s\n" round pooler ticks "per 10k tx" tps "pgbench us/tx" "postgres us/tx"
# Microseconds per transaction from a tick count.
per_tx_us() { python3 -c "import sys; print(f'{int(sys.argv[1]) * 1e6 / $TICKS_PER_SECOND / $TOTAL:.1f}')" "$1"; }
for round in $(seq "$ROUNDS"); do
    for pooler in pgbouncer skiff; do
        if [ "$pooler" = skiff ]; then
            read -r used tps client server < <(measure "$SKIFF_PORT" "$SKIFF_PID")
        else
            read -r used tps client server < <(measure "$BOUNCER_PORT" "$BOUNCER_PID")
        fi
        per=$(python3 -c "print(f'{$used * 10000 / $TOTAL:.1f}')")
        printf "%-6s %-10s %8s %12s %10s %14s %15s\n" "$round" "$pooler" "$used" "$per" "$tps" \
            "$(per_tx_us "$client")" "$(per_tx_us "$server")"
    done
done
