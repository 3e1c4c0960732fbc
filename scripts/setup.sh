#!/usr/bin/env bash
# Installs what skiff's tests and quick start need on a Debian 12 machine:
# PostgreSQL 15 server binaries and clients (initdb, pg_ctl, psql, pgbench),
# Redis (server, cli, sentinel), the Python SLS SDK, redis-py (with its
# client-side cache, 5.1 or later) and Celery, used by the tests.
set -euo pipefail

packages=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || packages+=(postgresql-15)
command -v psql >/dev/null || packages+=(postgresql-client-15)
command -v redis-server >/dev/null || packages+=(redis-server)
command -v redis-cli >/dev/null || packages+=(redis-tools)
command -v redis-sentinel >/dev/null || packages+=(redis-sentinel)
command -v runuser >/dev/null || packages+=(util-linux)

if [ ${#packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing packages ${packages[*]}; run as root or install them" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi

if command -v python3 >/dev/null && ! python3 -c 'import aliyun.log' 2>/dev/null; then
    python3 -m pip install --quiet aliyun-log-python-sdk || echo "setup: the SLS Python SDK could not be installed; its test will be skipped" >&2
fi

if command -v python3 >/dev/null && ! python3 -c 'from redis.cache import CacheConfig' 2>/dev/null; then
    python3 -m pip install --quiet 'redis>=5.1' || echo "setup: redis-py could not be installed; its test will be skipped" >&2
fi

# kombu's Redis transport also imports packaging, which celery does not pull in.
if command -v python3 >/dev/null && ! python3 -c 'import celery, packaging' 2>/dev/null; then
    python3 -m pip install --quiet celery packaging || echo "setup: Celery could not be installed; its test will be skipped" >&2
fi
