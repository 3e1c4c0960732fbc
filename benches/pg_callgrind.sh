#!/usr/bin/env bash
# Counts the instructions skiff and PgBouncer execute per pgbench -S
# transaction, with valgrind's callgrind. Each pooler runs under callgrind
# in front of the same PostgreSQL. After a short warm-up run the counters
# are zeroed, a fixed number of transactions runs, and the counters are
# dumped. The count covers every thread, kernel time excluded, and
# includes the logins of the measured run's clients.
#
# Usage: benches/pg_callgrind.sh [SKIFF_BINARY] [CLIENTS] [TRANSACTIONS_PER_CLIENT]
# Defaults: target/release/skiff, 50 clients, 100 transactions each. MODE
# (simple or prepared, default simple) sets pgbench's protocol. A release
# build with CARGO_PROFILE_RELEASE_DEBUG=true gives callgrind_annotate
# function names. The dumps are kept in the printed directory.
# Needs root, valgrind, pgbouncer and postgresql-15; 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

SKIFF=$(realpath "${1:-target/release/skiff}")
CLIENTS=${2:-50}
PER_CLIENT=${3:-100}
MODE=${MODE:-simple}
POOL_SIZE=20
WORK=$(mktemp -d /tmp/skiff-callgrind-XXXXXX)
chown postgres:postgres "$WORK"
. benches/pg_env.sh
PG_PORT=$(free_port); BOUNCER_PORT=$(free_port); SKIFF_PORT=$(free_port); ADMIN_PORT=$(free_port)
# Dumps outlive the run; cleanup removes WORK.
DUMPS=$(mktemp -d /tmp/skiff-callgrind-dumps-XXXXXX)
chmod 777 "$DUMPS"

# The pooler under callgrind, so an early exit does not leave it running.
POOLER_PID=""
trap '[ -n "$POOLER_PID" ] && kill "$POOLER_PID" 2>/dev/null; cleanup' EXIT
start_postgres

wait_for_port() {
    for _ in $(seq 120); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
        sleep 0.5
    done
    echo "nothing listens on port $1; see the logs in $DUMPS" >&2
    cp "$WORK"/*.log "$DUMPS"/ 2>/dev/null || true
    return 1
}

pgbench_run() {
    pgbench -h 127.0.0.1 -p "$1" -U postgres -S -n -c "$CLIENTS" -j 2 -t "$2" -M "$MODE" bench
}

# Runs one pooler under callgrind: $1 label, $2 port, $3 user, rest the
# command. Prints the instructions per transaction.
measure() {
    local label=$1 port=$2 user=$3
    shift 3
    runuser -u "$user" -- valgrind --tool=callgrind \
        --callgrind-out-file="$DUMPS/$label.%p" "$@" >"$WORK/$label.valgrind.log" 2>&1 &
    local runner=$! pid=""
    POOLER_PID=$runner
    wait_for_port "$port"
    pid=$(pgrep -P "$runner" | head -1)
    POOLER_PID=$pid
    # PgBouncer before 1.21 fails -M prepared, which makes pgbench exit 1.
    pgbench_run "$port" 5 >/dev/null 2>&1 || true
    runuser -u "$user" -- callgrind_control -z "$pid" >/dev/null 2>&1
    pgbench_run "$port" "$PER_CLIENT" 2>&1 | grep -E "^number of failed" || true
    runuser -u "$user" -- callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$runner" || true
    POOLER_PID=""
    local total instructions
    total=$((CLIENTS * PER_CLIENT))
    instructions=$(callgrind_annotate "$DUMPS/$label.$pid.1" 2>/dev/null |
        awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
    echo "$label: $instructions instructions for $total transactions, $((instructions / total)) per transaction"
}

write_pgbouncer_config
write_skiff_config

echo "pgbench -S -M $MODE -c $CLIENTS -j 2, pool size $POOL_SIZE; dumps in $DUMPS"
measure pgbouncer "$BOUNCER_PORT" postgres pgbouncer "$WORK/pgbouncer.ini"
SKIFF_LOG=warn measure skiff "$SKIFF_PORT" root "$SKIFF" --config "$WORK/skiff.toml"
