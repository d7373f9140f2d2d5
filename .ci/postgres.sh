#!/usr/bin/env bash
# Install and start PostgreSQL from Debian's packages on loopback for the storage contract tests.
# Idempotent: reuses an installed server, an initialised data dir and a running postmaster.
# Exports nothing: writes the URL to .ci/pg_url (gitignored); tests read RAGKV_TEST_PG_URL or that file.
set -euo pipefail
cd "$(dirname "$0")/.."
PGDIR="${RAGKV_PG_DIR:-${TMPDIR:-/tmp}/ragkv-ci-pg}"    # data dir, socket dir, password file, log
PORT="${RAGKV_PG_PORT:-55432}"
DB="${RAGKV_PG_DB:-ragkv_test}"

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/initdb" ]; then
    echo "ci: installing PostgreSQL from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
fi
BIN="$(bindir)"

# Run the server as `postgres` when we are root (initdb refuses root), else as ourselves.
if [ "$(id -u)" = 0 ]; then
    as_pg() { runuser -u postgres -- "$@"; }
    mkdir -p "$PGDIR" && chown postgres: "$PGDIR" && chmod 700 "$PGDIR"
else
    as_pg() { "$@"; }
    mkdir -p "$PGDIR" && chmod 700 "$PGDIR"
fi
PGUSER_NAME="$(as_pg id -un)"

if [ ! -s "$PGDIR/pwfile" ]; then
    as_pg sh -c "umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' > '$PGDIR/pwfile'"
fi
PW="$(cat "$PGDIR/pwfile")"

if [ ! -f "$PGDIR/data/PG_VERSION" ]; then
    as_pg "$BIN/initdb" -D "$PGDIR/data" -U "$PGUSER_NAME" --pwfile="$PGDIR/pwfile" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 >/dev/null
fi

if ! as_pg "$BIN/pg_ctl" -D "$PGDIR/data" status >/dev/null 2>&1; then
    as_pg "$BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGDIR -c fsync=off" start >/dev/null
fi

export PGPASSWORD="$PW"
PSQL=("$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$PGUSER_NAME" -d postgres -tAq)
if [ "$("${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    "${PSQL[@]}" -c "CREATE DATABASE $DB"
fi

# pgvector (shared retrieval): Debian's postgresql-NN-pgvector for the installed server's major version
# (in Debian from trixie on; on older releases add apt.postgresql.org). Without it the pgvector tests skip.
MAJOR="$(basename "$(dirname "$BIN")")"
if [ ! -f "/usr/share/postgresql/$MAJOR/extension/vector.control" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "postgresql-$MAJOR-pgvector" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq "postgresql-$MAJOR-pgvector" >/dev/null 2>&1; } \
        || echo "ci: postgresql-$MAJOR-pgvector is not available from apt; pgvector tests will skip"
fi
if [ -f "/usr/share/postgresql/$MAJOR/extension/vector.control" ]; then
    "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$PGUSER_NAME" -d "$DB" -tAq -c "CREATE EXTENSION IF NOT EXISTS vector"
    echo "ci: pgvector enabled in $DB"
fi

echo "postgresql+psycopg://$PGUSER_NAME:$PW@127.0.0.1:$PORT/$DB" > .ci/pg_url
chmod 600 .ci/pg_url
echo "ci: PostgreSQL ready on 127.0.0.1:$PORT, database $DB (URL in .ci/pg_url)"
