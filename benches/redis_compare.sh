#!/usr/bin/env bash
# Compares redis-benchmark throughput through skiff, twemproxy (nutcracker)
# and a direct connection to a standalone Redis, and through skiff and a
# direct cluster-aware client to a 6-node Redis Cluster, in one run.
#
# Usage: benches/redis_compare.sh [requests per run, default 200000]
#                                 [rounds, default 1]
#
# Runs at pipeline depth 16 send five times as many requests, so that
# they last about as long as those at depth 1 instead of a fraction of a
# second.
#
# With more than one round the targets take turns in each round, so
# background load hits them alike, and each figure is the median of the
# rounds. The proxies' CPU time per request (user and system, from /proc)
# is printed too: it moves much less than throughput from run to run.
# Needs Debian's redis-server, redis-tools and nutcracker. Everything
# listens on 127.0.0.1 only and is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${1:-200000}
ROUNDS=${2:-1}
WORK=$(mktemp -d /tmp/skiff-redis-bench-XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# A cluster node also listens on its port + 10000 (the cluster bus), and
# Redis refuses ports above 55535: pick a port whose bus port is free too.
cluster_port() {
    python3 -c 'import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    if port > 55535: continue
    b = socket.socket()
    try: b.bind(("127.0.0.1", port + 10000))
    except OSError: continue
    print(port); break'
}

command -v nutcracker >/dev/null || { apt-get update -qq && apt-get install -y -qq nutcracker; }
cargo build --release --locked -q

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT

start_redis() { # port [extra args...]
    local port=$1; shift
    mkdir -p "$WORK/$port"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$WORK/$port" --logfile "$WORK/$port/log" "$@" &
    PIDS+=($!)
}
wait_port() { # port; gives up after 30 s
    local tries=0
    until redis-cli -p "$1" ping >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ "$tries" -lt 300 ] || { echo "no reply to PING on port $1" >&2; exit 1; }
        sleep 0.1
    done
}

# Standalone Redis, twemproxy and skiff in front of it.
REDIS=$(free_port); start_redis "$REDIS"; wait_port "$REDIS"
TWEM=$(free_port)
cat > "$WORK/nutcracker.yml" <<CONF
bench:
  listen: 127.0.0.1:$TWEM
  hash: fnv1a_64
  distribution: ketama
  redis: true
  servers:
   - 127.0.0.1:$REDIS:1
CONF
nutcracker -c "$WORK/nutcracker.yml" -o "$WORK/nutcracker.log" -a 127.0.0.1 -s "$(free_port)" &
TWEM_PID=$!
PIDS+=($!)
SKIFF=$(free_port); ADMIN=$(free_port)
cat > "$WORK/standalone.toml" <<CONF
[admin]
listen = "127.0.0.1:$ADMIN"
[redis]
listen = "127.0.0.1:$SKIFF"
mode = "standalone"
nodes = ["127.0.0.1:$REDIS"]
CONF
SKIFF_LOG=warn target/release/skiff --config "$WORK/standalone.toml" >"$WORK/skiff1.log" 2>&1 &
SKIFF_PID=$!
PIDS+=($!)

# A 6-node cluster and skiff in cluster mode.
CLUSTER_PORTS=()
for _ in 1 2 3 4 5 6; do
    port=$(cluster_port); CLUSTER_PORTS+=("$port")
    start_redis "$port" --cluster-enabled yes --cluster-config-file "$WORK/nodes-$port.conf"
done
for port in "${CLUSTER_PORTS[@]}"; do wait_port "$port"; done
redis-cli --cluster create $(printf "127.0.0.1:%s " "${CLUSTER_PORTS[@]}") --cluster-replicas 1 --cluster-yes >/dev/null
until redis-cli -p "${CLUSTER_PORTS[0]}" cluster info | grep -q "cluster_state:ok"; do sleep 0.2; done
SKIFF_CLUSTER=$(free_port); ADMIN2=$(free_port)
cat > "$WORK/cluster.toml" <<CONF
[admin]
listen = "127.0.0.1:$ADMIN2"
[redis]
listen = "127.0.0.1:$SKIFF_CLUSTER"
mode = "cluster"
nodes = ["127.0.0.1:${CLUSTER_PORTS[0]}"]
CONF
SKIFF_LOG=warn target/release/skiff --config "$WORK/cluster.toml" >"$WORK/skiff2.log" 2>&1 &
SKIFF_CLUSTER_PID=$!
PIDS+=($!)
wait_port "$TWEM"; wait_port "$SKIFF"; wait_port "$SKIFF_CLUSTER"

# Prints "get_rps set_rps cpu_us_per_request" for one redis-benchmark run;
# the CPU is that of process $3 when it is not "-".
run() { # port pipeline pid [extra args]
    local port=$1 pipeline=$2 pid=$3 before=0 after=0 requests=$REQUESTS; shift 3
    [ "$pipeline" = 1 ] || requests=$((REQUESTS * 5))
    [ "$pid" = - ] || before=$(cpu_ticks "$pid")
    # A run that takes over 2 minutes is reported as 0 instead of hanging.
    local rates
    rates=$(timeout 120 redis-benchmark -h 127.0.0.1 -p "$port" -t get,set -c 50 -r 100000 -n "$requests" \
        -P "$pipeline" --csv "$@" 2>/dev/null |
        python3 -c 'import csv, sys
rows = {r[0]: r[1] for r in csv.reader(sys.stdin) if len(r) > 1}
print(rows.get("GET", "0"), rows.get("SET", "0"))')
    [ "$pid" = - ] || after=$(cpu_ticks "$pid")
    echo "$rates $(python3 -c "import os, sys; print(f'{int(sys.argv[1]) * 1e6 / os.sysconf(\"SC_CLK_TCK\") / (2 * int(sys.argv[2])):.2f}')" \
        "$((after - before))" "$requests")"
}
# User and system CPU time of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b else 'n/a')" "$1" "$2"; }
median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.0f}')" "$@"; }
median2() { python3 -c "import statistics, sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.2f}')" "$@"; }

echo "requests/s, medians of $ROUNDS round(s); cpu: the proxy's CPU time per request, in us"
printf "%-3s %-4s %12s %12s %12s %10s %10s %9s %9s\n" P cmd direct twemproxy skiff "skiff/twem" "skiff/dir" "twem cpu" "skiff cpu"
for pipeline in 1 16; do
    dg=(); ds=(); tg=(); ts=(); tc=(); sg=(); ss=(); sc=()
    for _ in $(seq "$ROUNDS"); do
        read -r g s _ < <(run "$REDIS" "$pipeline" -); dg+=("$g"); ds+=("$s")
        read -r g s c < <(run "$TWEM" "$pipeline" "$TWEM_PID"); tg+=("$g"); ts+=("$s"); tc+=("$c")
        read -r g s c < <(run "$SKIFF" "$pipeline" "$SKIFF_PID"); sg+=("$g"); ss+=("$s"); sc+=("$c")
    done
    direct_get=$(median "${dg[@]}"); direct_set=$(median "${ds[@]}")
    twem_get=$(median "${tg[@]}"); twem_set=$(median "${ts[@]}")
    skiff_get=$(median "${sg[@]}"); skiff_set=$(median "${ss[@]}")
    twem_cpu=$(median2 "${tc[@]}"); skiff_cpu=$(median2 "${sc[@]}")
    printf "%-3s %-4s %12s %12s %12s %10s %10s %9s %9s\n" "$pipeline" GET "$direct_get" "$twem_get" "$skiff_get" \
        "$(ratio "$skiff_get" "$twem_get")" "$(ratio "$skiff_get" "$direct_get")" "$twem_cpu" "$skiff_cpu"
    printf "%-3s %-4s %12s %12s %12s %10s %10s\n" "$pipeline" SET "$direct_set" "$twem_set" "$skiff_set" \
        "$(ratio "$skiff_set" "$twem_set")" "$(ratio "$skiff_set" "$direct_set")"
done
echo "(standalone; redis-benchmark -t get,set -c 50 -r 100000 -n $REQUESTS, five times that at depth 16; cpu over both commands)"

printf "\n%-3s %-4s %14s %12s %10s %9s\n" P cmd "direct --cluster" skiff "skiff/dir" "skiff cpu"
for pipeline in 1 16; do
    dg=(); ds=(); sg=(); ss=(); sc=()
    for _ in $(seq "$ROUNDS"); do
        read -r g s _ < <(run "${CLUSTER_PORTS[0]}" "$pipeline" - --cluster); dg+=("$g"); ds+=("$s")
        read -r g s c < <(run "$SKIFF_CLUSTER" "$pipeline" "$SKIFF_CLUSTER_PID"); sg+=("$g"); ss+=("$s"); sc+=("$c")
    done
    direct_get=$(median "${dg[@]}"); direct_set=$(median "${ds[@]}")
    skiff_get=$(median "${sg[@]}"); skiff_set=$(median "${ss[@]}"); skiff_cpu=$(median2 "${sc[@]}")
    printf "%-3s %-4s %14s %12s %10s %9s\n" "$pipeline" GET "$direct_get" "$skiff_get" "$(ratio "$skiff_get" "$direct_get")" "$skiff_cpu"
    printf "%-3s %-4s %14s %12s %10s\n" "$pipeline" SET "$direct_set" "$skiff_set" "$(ratio "$skiff_set" "$direct_set")"
done
echo "(cluster of 3 primaries and 3 replicas)"
