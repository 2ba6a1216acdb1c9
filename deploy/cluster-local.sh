#!/usr/bin/env bash
# Two navi-trio workers as one server on this machine: a redis-server on a loopback port
# (no persistence) and `hypercorn --workers 2`, sharing NAVI_DATABASE_URL (PostgreSQL:
# give yours) and one data directory (each host of a cluster may have its own: uploads are
# in PostgreSQL too). Ctrl-C stops both.
#
#   NAVI_DATABASE_URL=postgresql://user:pw@127.0.0.1:5432/navi deploy/cluster-local.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NAVI_DATABASE_URL:?set NAVI_DATABASE_URL to a PostgreSQL database}"
REDIS_PORT=${REDIS_PORT:-6390}
export NAVI_PORT=${NAVI_PORT:-8000}
export NAVI_DATA_DIR=${NAVI_DATA_DIR:-./navi-data}
export NAVI_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
export NAVI_DATABASE_URL
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize no &
REDIS_PID=$!
trap 'kill "$REDIS_PID" 2>/dev/null || true' EXIT
exec_workers() {
  .venv/bin/hypercorn --config python:navi_trio.hypercorn_conf --workers 2 navi_trio.asgi:app
}
exec_workers
