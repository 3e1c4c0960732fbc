#!/usr/bin/env bash
# Compares two skiff binaries on plain TCP (pgbench -S and redis-benchmark
# through each, alternating, several rounds), to check that a change to the
# connection code leaves the plain hot paths as fast as before; then
# measures the cost of TLS between skiff and PostgreSQL (sslmode disable
# against require on an ssl = on server).
#
# Usage: benches/tls_compare.sh BASE_BINARY NEW_BINARY [rounds, default 3]
# PG_SECONDS (default 8) and REDIS_REQUESTS (default 100000) size each run.
# Needs root (PostgreSQL runs as the postgres user), postgresql-15,
# pgbench, redis-server, redis-benchmark, openssl and python3. Everything
# listens on 127.0.0.1 only.
set -euo pipefail
BASE=$(realpath "$1")
NEW=$(realpath "$2")
ROUNDS=${3:-3}
SECONDS_PER_RUN=${PG_SECONDS:-8}
REDIS_REQUESTS=${REDIS_REQUESTS:-100000}
CLIENTS=50
WORK=$(mktemp -d /tmp/skiff-tls-bench-XXXXXX)
chown postgres:postgres "$WORK"
PG_BIN=/usr/lib/postgresql/15/bin

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port); REDIS_PORT=$(free_port)

cleanup() {
    [ -n "${SKIFF_PID:-}" ] && kill "$SKIFF_PID" 2>/dev/null || true
    [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

runuser -u postgres -- "$PG_BIN/initdb" -D "$WORK/data" -A trust -U postgres --no-sync >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$WORK/data/server.key" -out "$WORK/data/server.crt" 2>/dev/null
chown postgres:postgres "$WORK/data/server.key" "$WORK/data/server.crt"
chmod 600 "$WORK/data/server.key"
cat >> "$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 200
shared_buffers = 256MB
fsync = off
synchronous_commit = off
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
CONF
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE bench"
pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -q -s 10 bench >/dev/null 2>&1
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no --logfile "$WORK/redis.log" &
REDIS_PID=$!
sleep 0.5

# Starts a binary with [postgres] (extra lines for the database) and
# [redis] sections; sets SKIFF_PID, PG_LISTEN and REDIS_LISTEN.
start_skiff() {
    local binary=$1 database_extra=$2
    PG_LISTEN=$(free_port); REDIS_LISTEN=$(free_port)
    cat > "$WORK/skiff.toml" <<CONF
[admin]
listen = "127.0.0.1:$(free_port)"
[postgres]
listen = "127.0.0.1:$PG_LISTEN"
default_pool_size = 20
[[postgres.databases]]
name = "bench"
host = "127.0.0.1"
port = $PG_PORT
$database_extra
[redis]
listen = "127.0.0.1:$REDIS_LISTEN"
nodes = ["127.0.0.1:$REDIS_PORT"]
CONF
    SKIFF_LOG=warn "$binary" --config "$WORK/skiff.toml" >"$WORK/skiff.log" 2>&1 &
    SKIFF_PID=$!
    sleep 1
}

stop_skiff() {
    kill "$SKIFF_PID"; wait "$SKIFF_PID" 2>/dev/null || true; SKIFF_PID=
}

# CPU time skiff has used, in clock ticks (user + system).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SKIFF_PID/stat"; }

# Prints pgbench's tps and skiff's CPU ticks per 10,000 transactions, which
# a loaded machine disturbs less than throughput.
pg_run() {
    local before after output transactions
    before=$(cpu_ticks)
    output=$(pgbench -h 127.0.0.1 -p "$PG_LISTEN" -U postgres -S -n -c "$CLIENTS" -j 2 \
        -T "$SECONDS_PER_RUN" bench 2>/dev/null)
    after=$(cpu_ticks)
    transactions=$(echo "$output" | awk '/actually processed/ {print $NF}')
    echo "$output" | awk '/^tps/ {printf "%d ", $3}'
    echo "$before $after $transactions" | awk '{printf "%.1f", ($2 - $1) * 10000 / $3}'
}

# Prints redis-benchmark's GET requests per second at a pipeline depth,
# and skiff's CPU ticks per 100,000 requests.
redis_run() {
    local pipeline=$1 before after
    before=$(cpu_ticks)
    redis-benchmark -h 127.0.0.1 -p "$REDIS_LISTEN" -t get -c "$CLIENTS" -r 100000 \
        -n "$REDIS_REQUESTS" -P "$pipeline" -q 2>/dev/null | tr '\r' '\n' \
        | awk '/requests per second/ {printf "%d ", $2}'
    after=$(cpu_ticks)
    echo $(((after - before) * 100000 / REDIS_REQUESTS))
}

echo "round binary pgbench_tps ticks_per_10k get_rps_p1 ticks_per_100k get_rps_p16 ticks_per_100k"
for round in $(seq "$ROUNDS"); do
    # Odd rounds run the base binary first, even rounds the new one, so
    # neither always runs on a machine warmed by the other.
    order="base new"; [ $((round % 2)) = 0 ] && order="new base"
    for name in $order; do
        # The base binary predates the sslmode setting, and never uses TLS.
        if [ "$name" = base ]; then start_skiff "$BASE" ''; else start_skiff "$NEW" 'sslmode = "disable"'; fi
        echo "$round $name $(pg_run) $(redis_run 1) $(redis_run 16)"
        stop_skiff
    done
done

echo "round sslmode pgbench_tps skiff_ticks_per_10k"
for round in $(seq "$ROUNDS"); do
    for mode in disable require; do
        start_skiff "$NEW" "sslmode = \"$mode\""
        echo "$round $mode $(pg_run)"
        stop_skiff
    done
done
