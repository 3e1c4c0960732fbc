#!/usr/bin/env bash
# Compares pgbench -S throughput through skiff, PgBouncer (transaction mode,
# same pool size) and a direct connection, in one run on one machine, and
# measures skiff's RSS with 10,000 idle client connections.
#
# Usage: benches/pg_compare.sh [seconds per run, default 15]
# Needs root (PostgreSQL runs as the postgres user) and Debian's pgbouncer,
# postgresql-15 and python3. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000

DURATION=${1:-15}
POOL_SIZE=20
WORK=$(mktemp -d /tmp/skiff-bench-XXXXXX)
chown postgres:postgres "$WORK"
. benches/pg_env.sh
PG_PORT=$(free_port); BOUNCER_PORT=$(free_port); SKIFF_PORT=$(free_port); ADMIN_PORT=$(free_port)

command -v pgbouncer >/dev/null || { apt-get update -qq && apt-get install -y -qq pgbouncer; }
cargo build --release --locked -q

trap cleanup EXIT
start_postgres
start_pgbouncer

start_skiff target/release/skiff

# Prints "tps failed" for one pgbench run.
run() {
    local port=$1 clients=$2 mode=$3 out
    out=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -S -n -c "$clients" -j 2 -T "$DURATION" -M "$mode" bench 2>&1 || true)
    local tps failed
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
    failed=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' | head -1)
    if echo "$out" | grep -q "aborted\|error"; then
        failed="${failed:-0}+errors"
        # grep stops reading early, which fails echo with SIGPIPE.
        echo "$out" | grep -m2 "aborted\|error" | sed "s/^/    port $port: /" >&2 || true
    fi
    echo "${tps:-0} ${failed:-?}"
}

# Prints a/b with two decimals, or n/a when b is zero.
ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b else 'n/a')" "$1" "$2"; }

printf "%-8s %-9s %12s %12s %12s %10s %10s\n" clients mode direct pgbouncer skiff "skiff/pgb" "skiff/dir"
declare -A RESULT
for clients in 50 500; do
    for mode in simple prepared; do
        read -r direct_tps direct_failed < <(run "$PG_PORT" "$clients" "$mode")
        read -r bouncer_tps bouncer_failed < <(run "$BOUNCER_PORT" "$clients" "$mode")
        read -r skiff_tps skiff_failed < <(run "$SKIFF_PORT" "$clients" "$mode")
        RESULT["$clients-$mode"]=$bouncer_tps
        printf "%-8s %-9s %12s %12s %12s %10s %10s\n" "$clients" "$mode" \
            "$direct_tps" "$bouncer_tps/$bouncer_failed" "$skiff_tps/$skiff_failed" \
            "$(ratio "$skiff_tps" "$bouncer_tps")" "$(ratio "$skiff_tps" "$direct_tps")"
        if [ "$mode" = prepared ]; then
            simple=${RESULT["$clients-simple"]}
            echo "         skiff prepared vs PgBouncer simple at $clients clients: $(ratio "$skiff_tps" "$simple")"
        fi
    done
done
echo "(tps/failed transactions; pgbench -S -j 2 -T $DURATION, pool size $POOL_SIZE)"

# RSS with 10,000 idle client connections that have logged in.
python3 - "$SKIFF_PORT" "$SKIFF_PID" <<'PY'
import socket, struct, sys, time
port, pid = int(sys.argv[1]), sys.argv[2]
def rss_mb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
params = b"user\0postgres\0database\0bench\0\0"
startup = struct.pack("!II", 8 + len(params), 196608) + params
before = rss_mb()
socks = []
for _ in range(10000):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(startup)
    buf = b""
    while not buf.endswith(b"Z\0\0\0\x05I"):
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("skiff closed a client during login")
        buf += chunk
    socks.append(s)
time.sleep(1)
print(f"skiff RSS: {before:.1f} MB before, {rss_mb():.1f} MB with {len(socks)} idle logged-in clients")
PY
