#!/usr/bin/env bash
# Install and start redis-server from Debian's packages on loopback for the Redis tier tests.
# Idempotent: reuses an installed server and a running one on the same port.
# Exports nothing: writes the URL to .ci/redis_url (gitignored); tests read RAGKV_TEST_REDIS_URL or that file.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${RAGKV_REDIS_PORT:-56379}"
DIR="${RAGKV_REDIS_DIR:-${TMPDIR:-/tmp}/ragkv-ci-redis}"     # pid file and log
MAXMEM="${RAGKV_REDIS_MAXMEMORY:-256mb}"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "ci: installing redis-server from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq redis-server >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq redis-server >/dev/null; }
fi
mkdir -p "$DIR"

if ! redis-cli -h 127.0.0.1 -p "$PORT" ping >/dev/null 2>&1; then
    # no persistence (a cache), LRU eviction over every key when full, loopback only
    redis-server --port "$PORT" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
        --maxmemory "$MAXMEM" --maxmemory-policy allkeys-lru \
        --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" --dir "$DIR"
    for _ in $(seq 50); do
        redis-cli -h 127.0.0.1 -p "$PORT" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
redis-cli -h 127.0.0.1 -p "$PORT" ping >/dev/null

echo "redis://127.0.0.1:$PORT/0" > .ci/redis_url
echo "ci: Redis ready on 127.0.0.1:$PORT (URL in .ci/redis_url)"
