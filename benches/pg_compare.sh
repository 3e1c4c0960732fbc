#!/usr/bin/env bash
# Compares pgbench -S throughput through skiff, PgBouncer (transaction mode,
# same pool size) and a direct connection, in one run on one machine, and
# measures skiff's RSS with 10,000 idle client connections.
#
# Usage: benches/pg_compare.sh [seconds per run, default 15] [rounds, default 1]
#
# With more than one round the three targets take turns in each round, so
# background load hits them alike, and each figure is the median of the
# rounds. Each pooler's CPU time per transaction (user and system, read
# from /proc) is printed too: on a machine whose cores pgbench and
# PostgreSQL keep busy, it decides how fast a pooler can go.
# Needs root (PostgreSQL runs as the postgres user) and Debian's pgbouncer,
# postgresql-15 and python3. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000

DURATION=${1:-15}
ROUNDS=${2:-1}
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
# Prints "tps failed cpu_us_per_transaction" of one pgbench run; the CPU
# is that of process $4 when given.
run() {
    local port=$1 clients=$2 mode=$3 pid=${4:-} out before=0 after=0
    [ -n "$pid" ] && before=$(cpu_ticks "$pid")
    out=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -S -n -c "$clients" -j 2 -T "$DURATION" -M "$mode" bench 2>&1 || true)
    [ -n "$pid" ] && after=$(cpu_ticks "$pid")
    local tps failed count
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
    failed=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' | head -1)
    count=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' | head -1)
    if echo "$out" | grep -q "aborted\|error"; then
        failed="${failed:-0}+errors"
        echo "$out" | grep -m2 "aborted\|error" | sed "s/^/    port $port: /" >&2 || true
    fi
    local cpu
    cpu=$(python3 -c "import os, sys; t = int(sys.argv[2] or 0); print(f'{(int(sys.argv[1])) * 1e6 / os.sysconf(\"SC_CLK_TCK\") / t:.1f}' if t else '0')" \
        "$((after - before))" "$count")
    echo "${tps:-0} ${failed:-?} $cpu"
}

# User and system CPU time of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b else 'n/a')" "$1" "$2"; }
median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.0f}')" "$@"; }
median1() { python3 -c "import statistics, sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.1f}')" "$@"; }
# "median" alone for one round, "median (min-max)" for more.
summary() { python3 -c "import statistics, sys; v = sorted(float(x) for x in sys.argv[1:]); print(f'{statistics.median(v):.0f}' + (f' ({v[0]:.0f}-{v[-1]:.0f})' if len(v) > 1 else ''))" "$@"; }
# The failure marks of several runs: "0" when all are clean.
failures() { local f; for f in "$@"; do [ "$f" = 0 ] || { echo "$f"; return; }; done; echo 0; }

echo "tps (failed transactions); medians of $ROUNDS round(s); CPU in us per transaction"
printf "%-8s %-9s %16s %22s %22s %10s %10s %9s %9s\n" clients mode direct pgbouncer skiff "skiff/pgb" "skiff/dir" "pgb cpu" "skiff cpu"
declare -A RESULT
for clients in 50 500; do
    for mode in simple prepared; do
        d=(); b=(); s=(); bf=(); sf=(); bc=(); sc=()
        for _ in $(seq "$ROUNDS"); do
            read -r tps _ _ < <(run "$PG_PORT" "$clients" "$mode"); d+=("$tps")
            read -r tps failed cpu < <(run "$BOUNCER_PORT" "$clients" "$mode" "$BOUNCER_PID")
            b+=("$tps"); bf+=("$failed"); bc+=("$cpu")
            read -r tps failed cpu < <(run "$SKIFF_PORT" "$clients" "$mode" "$SKIFF_PID")
            s+=("$tps"); sf+=("$failed"); sc+=("$cpu")
        done
        direct_tps=$(median "${d[@]}"); bouncer_tps=$(median "${b[@]}"); skiff_tps=$(median "${s[@]}")
        RESULT["$clients-$mode"]=$bouncer_tps
        printf "%-8s %-9s %16s %22s %22s %10s %10s %9s %9s\n" "$clients" "$mode" \
            "$(summary "${d[@]}")" "$(summary "${b[@]}")/$(failures "${bf[@]}")" \
            "$(summary "${s[@]}")/$(failures "${sf[@]}")" \
            "$(ratio "$skiff_tps" "$bouncer_tps")" "$(ratio "$skiff_tps" "$direct_tps")" \
            "$(median1 "${bc[@]}")" "$(median1 "${sc[@]}")"
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
