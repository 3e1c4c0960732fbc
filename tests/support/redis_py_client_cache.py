"""redis-py with its client-side cache on (RESP3 and CLIENT TRACKING ON),
connected through skiff, while another client changes keys straight on
Redis.

Usage: redis_py_client_cache.py SKIFF_PORT REDIS_PORT KEY...

For each key it prints, as one JSON object: how many of 50 repeated reads
reached Redis (0 when redis-py served them from its own cache), and how
many milliseconds passed after the direct write until redis-py returned
the new value. It exits non-zero when a key still reads stale after 5 s.
"""

import json
import sys
import time

import redis
from redis.cache import CacheConfig
from redis.connection import CacheProxyConnection

# redis-py enables its cache only when HELLO reports Redis 7.4 or later.
# skiff reports the upstream's version, and the Redis these tests start may
# be older. skiff serves CLIENT TRACKING itself, so the floor is lowered to
# Redis 6.0, which introduced it.
CacheProxyConnection.MIN_ALLOWED_VERSION = "6.0.0"

skiff_port, redis_port = int(sys.argv[1]), int(sys.argv[2])
keys = sys.argv[3:]

cached = redis.Redis(
    host="127.0.0.1", port=skiff_port, protocol=3, cache_config=CacheConfig()
)
direct = redis.Redis(host="127.0.0.1", port=redis_port)


def get_calls():
    return direct.info("commandstats").get("cmdstat_get", {}).get("calls", 0)


result = {}
for key in keys:
    direct.set(key, "v1")
    assert cached.get(key) == b"v1"
    # skiff sends new tracking clients a push to drop everything once its
    # own tracking connections are up, so that happens before counting.
    time.sleep(0.3)
    assert cached.get(key) == b"v1"
    before = get_calls()
    for _ in range(50):
        assert cached.get(key) == b"v1"
    result[key] = {"reads_reaching_redis": get_calls() - before}

    direct.set(key, "v2")
    written = time.monotonic()
    while True:
        value = cached.get(key)
        if value == b"v2":
            break
        if time.monotonic() - written > 5:
            sys.exit(f"{key} still reads {value!r} 5 s after it changed")
        time.sleep(0.0005)
    result[key]["stale_ms"] = (time.monotonic() - written) * 1000

print(json.dumps(result))
