#!/usr/bin/env bash
# The benchmark: ingestion through the handler beside its baselines, in one run, on this machine.
# Starts PostgreSQL and Redis when missing; prints the table and the ratios. Not part of the tests.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MB_ROOT"
ensure_postgres
ensure_redis
export SQLX_OFFLINE=true
export BENCH_DATABASE_URL=${BENCH_DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:$REDIS_PORT}
cargo run --quiet --release --locked -p meterbridge-bench -- "$@"
