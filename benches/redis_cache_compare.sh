#!/usr/bin/env bash
# Compares GET throughput on a hot key set of 1000 keys through skiff with
# the near cache on, skiff with it off, and straight to Redis, in one run:
#
#  1. on loopback (127.0.0.1), with redis-benchmark -t get -c 50 -r 1000 at
#     pipeline depth 1 and 16, also reporting how much the upstream's
#     total_commands_processed grew per request served with the cache on;
#  2. with Redis behind 1 ms of added latency: Redis runs in a network
#     namespace `skiff-bench`, skiff and redis-benchmark in another,
#     `skiff-bench-app`, joined by a veth pair with 10.203.0.1 and
#     10.203.0.2. `tc netem` on the app side of the pair adds the delay.
#     A kernel without netem gets examples/latency_proxy.rs in Redis's
#     namespace instead. Both delay requests and not replies.
#
# With 50 clients at depth 1, uncached throughput across the delay is
# bounded by 50 requests per round trip; the delayed runs are therefore
# also made with 10 clients.
#
# Each figure is the median of ROUNDS runs, the compared targets taking
# turns so that background load hits them alike; the range follows it.
#
# Usage: benches/redis_cache_compare.sh [requests per loopback run, default
# 200000] [requests per delayed run, default 50000] [rounds, default 3]
# Must run as root (namespaces). Needs redis-server, redis-tools, iproute2.
# Everything it creates is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${1:-200000}
DELAYED_REQUESTS=${2:-50000}
ROUNDS=${3:-3}
KEYS=1000
DELAY_MICROS=1000
WORK=$(mktemp -d /tmp/skiff-cache-bench-XXXXXX)
NS_REDIS=skiff-bench
NS_APP=skiff-bench-app
REDIS_IP=10.203.0.2
APP_IP=10.203.0.1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

command -v ip >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2; }
cargo build --release --locked -q
cargo build --release --locked -q --example latency_proxy

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    ip netns del "$NS_REDIS" 2>/dev/null || true
    ip netns del "$NS_APP" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() { # host port [netns]
    local run=()
    [ -n "${3:-}" ] && run=(ip netns exec "$3")
    for _ in $(seq 100); do
        "${run[@]}" redis-cli -h "$1" -p "$2" ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "no Redis server replies to PING on $1:$2" >&2
    exit 1
}

# Writes a skiff config: name listen upstream cache(yes|no) [threads]
skiff_config() {
    local name=$1 listen=$2 upstream=$3 cache=$4 threads=${5:-}
    {
        echo "[admin]"
        echo "listen = \"127.0.0.1:$(free_port)\""
        echo "[redis]"
        echo "listen = \"$listen\""
        echo "nodes = [\"$upstream\"]"
        [ -z "$threads" ] || echo "threads = $threads"
        if [ "$cache" = yes ]; then
            printf '[[redis.cache]]\nprefix = "key:"\nmax_ttl = "300s"\n'
        fi
    } > "$WORK/$name.toml"
}

# Stores the 1000 keys redis-benchmark reads (key:000000000000 and on).
fill_keys() { # redis-cli arguments...
    local value
    value=$(printf 'v%.0s' $(seq 64))
    for i in $(seq 0 $((KEYS - 1))); do printf 'SET key:%012d %s\n' "$i" "$value"; done |
        "$@" >/dev/null
}

# Prints requests per second of one GET run.
# run_get host port depth [clients requests netns]
run_get() {
    local run=()
    [ -n "${6:-}" ] && run=(ip netns exec "$6")
    "${run[@]}" timeout 300 redis-benchmark -h "$1" -p "$2" -t get -c "${4:-50}" -r "$KEYS" \
        -n "${5:-$REQUESTS}" -P "$3" --csv 2>/dev/null |
        python3 -c 'import csv, sys
rows = {r[0]: r[1] for r in csv.reader(sys.stdin) if len(r) > 1}
print(rows.get("GET", "0"))'
}

commands_processed() { # redis-cli arguments...
    "$@" info stats | tr -d '\r' | awk -F: '/^total_commands_processed:/ {print $2}'
}

# Prints "median (min-max)" of the numbers given.
summary() { python3 -c "import statistics, sys; v = sorted(float(x) for x in sys.argv[1:]); print(f'{statistics.median(v):.0f} ({v[0]:.0f}-{v[-1]:.0f})')" "$@"; }
median() { python3 -c "import statistics, sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }

ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b else 'n/a')" "$1" "$2"; }

echo "== loopback: redis-benchmark -t get -c 50 -r $KEYS -n $REQUESTS =="
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
REDIS=$(free_port)
mkdir -p "$WORK/redis"
redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK/redis" --logfile "$WORK/redis/log" &
PIDS+=($!)
wait_port 127.0.0.1 "$REDIS"
fill_keys redis-cli -p "$REDIS"
CACHED=$(free_port); CACHED_ALL=$(free_port); UNCACHED=$(free_port)
skiff_config cached "127.0.0.1:$CACHED" "127.0.0.1:$REDIS" yes
skiff_config cached-all "127.0.0.1:$CACHED_ALL" "127.0.0.1:$REDIS" yes "$(nproc)"
skiff_config uncached "127.0.0.1:$UNCACHED" "127.0.0.1:$REDIS" no
SKIFF_LOG=warn target/release/skiff --config "$WORK/cached.toml" >"$WORK/cached.log" 2>&1 &
PIDS+=($!)
# The same with one Redis thread per core instead of the default half.
SKIFF_LOG=warn target/release/skiff --config "$WORK/cached-all.toml" >"$WORK/cached-all.log" 2>&1 &
PIDS+=($!)
SKIFF_LOG=warn target/release/skiff --config "$WORK/uncached.toml" >"$WORK/uncached.log" 2>&1 &
PIDS+=($!)
wait_port 127.0.0.1 "$CACHED"; wait_port 127.0.0.1 "$CACHED_ALL"; wait_port 127.0.0.1 "$UNCACHED"
# Warm the caches: every key read once.
run_get 127.0.0.1 "$CACHED" 16 >/dev/null
run_get 127.0.0.1 "$CACHED_ALL" 16 >/dev/null

echo "cached: default [redis] threads (half the $(nproc) cores); cached-all: threads = $(nproc)"
echo "requests/s, median of $ROUNDS runs (min-max); ratios of medians"
for depth in 1 16; do
    direct=(); uncached=(); cached=(); cached_all=(); upstream=()
    for _ in $(seq "$ROUNDS"); do
        direct+=("$(run_get 127.0.0.1 "$REDIS" "$depth")")
        uncached+=("$(run_get 127.0.0.1 "$UNCACHED" "$depth")")
        before=$(commands_processed redis-cli -p "$REDIS")
        cached+=("$(run_get 127.0.0.1 "$CACHED" "$depth")")
        cached_all+=("$(run_get 127.0.0.1 "$CACHED_ALL" "$depth")")
        after=$(commands_processed redis-cli -p "$REDIS")
        upstream+=($((after - before)))
    done
    total_upstream=$(python3 -c "import sys; print(sum(int(x) for x in sys.argv[1:]))" "${upstream[@]}")
    per_request=$(python3 -c "print(f'{$total_upstream / (2 * $ROUNDS * $REQUESTS):.5f}')")
    d=$(median "${direct[@]}"); u=$(median "${uncached[@]}")
    c=$(median "${cached[@]}"); ca=$(median "${cached_all[@]}")
    echo "depth $depth:"
    echo "  direct     $(summary "${direct[@]}")"
    echo "  uncached   $(summary "${uncached[@]}")"
    echo "  cached     $(summary "${cached[@]}")"
    echo "  cached-all $(summary "${cached_all[@]}")"
    echo "  cached/direct $(ratio "$c" "$d")  cached-all/direct $(ratio "$ca" "$d")  cached/uncached $(ratio "$c" "$u")"
    echo "  upstream commands per request served with the cache on: $per_request ($total_upstream in all)"
done

echo
echo "== Redis behind ${DELAY_MICROS} us of added latency =="
ip netns del "$NS_REDIS" 2>/dev/null || true
ip netns del "$NS_APP" 2>/dev/null || true
ip netns add "$NS_REDIS"
ip netns add "$NS_APP"
ip link add sb-app type veth peer name sb-redis
ip link set sb-app netns "$NS_APP"
ip link set sb-redis netns "$NS_REDIS"
ip -n "$NS_APP" addr add "$APP_IP/30" dev sb-app
ip -n "$NS_REDIS" addr add "$REDIS_IP/30" dev sb-redis
for ns in "$NS_APP" "$NS_REDIS"; do ip -n "$ns" link set lo up; done
ip -n "$NS_APP" link set sb-app up
ip -n "$NS_REDIS" link set sb-redis up

mkdir -p "$WORK/redis-ns"
ip netns exec "$NS_REDIS" redis-server --port 6379 --bind "$REDIS_IP" 127.0.0.1 --save "" \
    --appendonly no --dir "$WORK/redis-ns" --logfile "$WORK/redis-ns/log" &
PIDS+=($!)
wait_port 127.0.0.1 6379 "$NS_REDIS"
fill_keys ip netns exec "$NS_REDIS" redis-cli -p 6379
if ip netns exec "$NS_APP" tc qdisc add dev sb-app root netem delay "${DELAY_MICROS}us" 2>/dev/null; then
    METHOD="tc netem on the veth (requests delayed)"
    UPSTREAM="$REDIS_IP:6379"
else
    METHOD="examples/latency_proxy.rs in front of Redis (no netem in this kernel; requests delayed)"
    ip netns exec "$NS_REDIS" target/release/examples/latency_proxy "$REDIS_IP:6380" "127.0.0.1:6379" \
        "$DELAY_MICROS" &
    PIDS+=($!)
    UPSTREAM="$REDIS_IP:6380"
fi
UP_HOST=${UPSTREAM%:*}; UP_PORT=${UPSTREAM#*:}
wait_port "$UP_HOST" "$UP_PORT" "$NS_APP"
skiff_config ns-cached "127.0.0.1:7001" "$UPSTREAM" yes
skiff_config ns-uncached "127.0.0.1:7002" "$UPSTREAM" no
SKIFF_LOG=warn ip netns exec "$NS_APP" target/release/skiff --config "$WORK/ns-cached.toml" \
    >"$WORK/ns-cached.log" 2>&1 &
PIDS+=($!)
SKIFF_LOG=warn ip netns exec "$NS_APP" target/release/skiff --config "$WORK/ns-uncached.toml" \
    >"$WORK/ns-uncached.log" 2>&1 &
PIDS+=($!)
wait_port 127.0.0.1 7001 "$NS_APP"; wait_port 127.0.0.1 7002 "$NS_APP"
echo "latency: $METHOD"
ping_ms=$(ip netns exec "$NS_APP" python3 -c "
import socket, time
s = socket.create_connection(('$UP_HOST', $UP_PORT)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
samples = []
for _ in range(200):
    t = time.perf_counter(); s.sendall(b'PING\r\n'); s.recv(64); samples.append(time.perf_counter() - t)
samples.sort(); print(f'{samples[len(samples) // 2] * 1000:.3f}')")
echo "median PING round trip to Redis from skiff's namespace: $ping_ms ms"
run_get 127.0.0.1 7001 16 50 "$REQUESTS" "$NS_APP" >/dev/null

echo "requests/s, median of $ROUNDS runs (min-max); ratio of medians"
for clients in 50 10; do
    for depth in 1 16; do
        direct=(); uncached=(); cached=()
        for _ in $(seq "$ROUNDS"); do
            direct+=("$(run_get "$UP_HOST" "$UP_PORT" "$depth" "$clients" "$DELAYED_REQUESTS" "$NS_APP")")
            uncached+=("$(run_get 127.0.0.1 7002 "$depth" "$clients" "$DELAYED_REQUESTS" "$NS_APP")")
            cached+=("$(run_get 127.0.0.1 7001 "$depth" "$clients" "$DELAYED_REQUESTS" "$NS_APP")")
        done
        echo "$clients clients, depth $depth:"
        echo "  direct     $(summary "${direct[@]}")"
        echo "  uncached   $(summary "${uncached[@]}")"
        echo "  cached     $(summary "${cached[@]}")"
        echo "  cached/uncached $(ratio "$(median "${cached[@]}")" "$(median "${uncached[@]}")")"
    done
done
echo "($(nproc) cores shared by Redis, skiff, the proxy if any and redis-benchmark;"
echo " load average after: $(cut -d' ' -f1-3 /proc/loadavg))"
