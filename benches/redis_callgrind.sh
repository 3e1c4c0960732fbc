#!/usr/bin/env bash
# Counts the user-space instructions skiff (and twemproxy, for comparison)
# executes per GET, with valgrind's callgrind: redis-benchmark -t get -c 50
# -r 1000 at pipeline depth 1 and 16 against skiff with the near cache off
# and on, and against Debian's nutcracker (twemproxy). Counting starts after
# a warm-up run of 5,000 requests and covers REQUESTS requests, so startup
# and connection setup are left out. Kernel time is not counted.
#
# Usage: benches/redis_callgrind.sh [skiff binary, default
# target/release/skiff] [requests, default 20000]
# Needs valgrind, redis-server, redis-tools and nutcracker. Everything it
# starts is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SKIFF=${1:-target/release/skiff}
REQUESTS=${2:-20000}
WORK=$(mktemp -d /tmp/skiff-callgrind-XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port; gives up after 60 s
    local tries=0
    until redis-cli -p "$1" ping >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ "$tries" -lt 300 ] || { echo "no reply to PING on port $1" >&2; exit 1; }
        sleep 0.2
    done
}

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT

REDIS=$(free_port)
redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
PIDS+=($!)
wait_port "$REDIS"
value=$(printf 'v%.0s' $(seq 64))
for i in $(seq 0 999); do printf 'SET key:%012d %s\n' "$i" "$value"; done |
    redis-cli -p "$REDIS" >/dev/null

# Prints instructions per request of one target: kind (nocache, cache or
# twemproxy) and pipeline depth.
measure() {
    local kind=$1 depth=$2 port pid out
    port=$(free_port)
    out="$WORK/callgrind.$kind.$depth"
    if [ "$kind" = twemproxy ]; then
        printf 'bench:\n  listen: 127.0.0.1:%s\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  servers:\n   - 127.0.0.1:%s:1\n' \
            "$port" "$REDIS" > "$WORK/nutcracker.yml"
        valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
            nutcracker -c "$WORK/nutcracker.yml" -o "$WORK/nutcracker.log" -a 127.0.0.1 -s "$(free_port)" 2>>"$WORK/valgrind.log" &
    else
        {
            echo "[admin]"
            echo "listen = \"127.0.0.1:$(free_port)\""
            echo "[redis]"
            echo "listen = \"127.0.0.1:$port\""
            echo "nodes = [\"127.0.0.1:$REDIS\"]"
            if [ "$kind" = cache ]; then
                printf '[[redis.cache]]\nprefix = "key:"\nmax_ttl = "300s"\n'
            fi
        } > "$WORK/skiff.toml"
        SKIFF_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
            "$SKIFF" --config "$WORK/skiff.toml" >"$WORK/skiff.log" 2>>"$WORK/valgrind.log" &
    fi
    pid=$!
    PIDS+=("$pid")

    wait_port "$port"
    redis-benchmark -p "$port" -t get -c 50 -r 1000 -n 5000 -P "$depth" -q >/dev/null 2>&1
    callgrind_control -i on "$pid" >/dev/null 2>&1
    redis-benchmark -p "$port" -t get -c 50 -r 1000 -n "$REQUESTS" -P "$depth" -q >/dev/null 2>&1
    callgrind_control -i off "$pid" >/dev/null 2>&1
    callgrind_control -d "$pid" >/dev/null 2>&1

    kill "$pid"
    wait "$pid" 2>/dev/null || true
    local total
    total=$(callgrind_annotate "$out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    printf "%-10s %5s %12s\n" "$kind" "$depth" "$((total / REQUESTS))"
}

printf "%-10s %5s %12s\n" target depth "instr/GET"
for kind in nocache cache twemproxy; do
    for depth in 1 16; do measure "$kind" "$depth"; done
done
echo "(redis-benchmark -t get -c 50 -r 1000 -n $REQUESTS, user-space instructions per request)"
