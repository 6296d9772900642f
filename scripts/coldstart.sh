#!/usr/bin/env bash
# Cold start of every function (a command, not a test: timings belong beside a baseline, not in
# assertions). Builds the release binaries for this machine, then runs scripts/coldstart.py: each
# function started 10 times against a local stand-in for the Lambda Runtime API, reading its
# secrets from moto and connecting to the local PostgreSQL and Redis. Needs scripts/demo.sh to
# have run (the secrets, the demo tenant and its keys). docs/deploy.md, "Cold start", keeps the figures.
#   scripts/coldstart.sh [RUNS]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MB_ROOT"
ensure_services
[ -f "$MB_CACHE/demo-keys.env" ] || { echo "run scripts/demo.sh first (it seeds the secrets and keys)" >&2; exit 1; }
export SQLX_OFFLINE=true
unset DATABASE_URL REDIS_URL
say "cargo build --release (this machine's architecture)"
cargo build --release --locked --quiet -p admin -p ingest-usage -p verify-payment -p outbox-relay -p aggregate-usage
python3 scripts/coldstart.py "$CARGO_TARGET_DIR/release" "$MB_CACHE/demo-keys.env" "${1:-10}"
