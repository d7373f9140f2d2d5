#!/usr/bin/env bash
# Install and start PostgreSQL from Debian's packages on loopback for the storage contract tests.
# Exports nothing: tests find it at RAGKV_TEST_PG_URL, written to .ci/pg_url.
set -euo pipefail
echo "ci: PostgreSQL setup is added by the storage work"
exit 1
