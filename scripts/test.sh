#!/usr/bin/env bash
# Command 2: everything the project checks — formatting, clippy, the SAM template lint, the
# OpenAPI contract (validated, and fuzzed by Schemathesis against the running stack), the docs
# check and the full test suite against real PostgreSQL, Redis and moto (started here when missing).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MB_ROOT"

ensure_services
ensure_sam_venv
ensure_contract_venv
# The TLS tests make their certificates with openssl and start their own redis-server/PostgreSQL.
command -v openssl >/dev/null || apt_install openssl

# sqlx::test gives every test its own database, created through this URL; queries compile from
# the committed .sqlx/ data, so the build needs no database.
export DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT/postgres"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SQLX_OFFLINE=true
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "template lint (cfn-lint, sam validate --lint)"
"$MB_SAM_VENV/bin/cfn-lint" template.yaml
bash scripts/sam.sh validate --lint --region "$AWS_REGION" >/dev/null   # the wrapper docs/deploy.md documents

say "OpenAPI contract: openapi-spec-validator (routes and examples against the code: tests/contract.rs)"
"$MB_CONTRACT_VENV/bin/openapi-spec-validator" openapi.yaml

say "docs check (scripts/check_docs.py)"
# Links and anchors of README.md, CONTRIBUTING.md and docs/; the tests named as evidence exist;
# the configuration table of docs/configuration.md and the variables the code reads agree.
python3 scripts/check_docs.py

say "end to end: scripts/demo.sh (every function under cargo lambda watch, secrets from moto)"
# The demo checks every response it prints; it runs before the suite so the test runner's
# summary closes the output. It runs under strace, which records the command line of every
# program it starts: none may carry a key or a password (ps shows them to every user).
command -v strace >/dev/null || apt_install strace
EXECVE_LOG=$MB_CACHE/demo-execve.log
(unset DATABASE_URL REDIS_URL
 strace -f -qq -b execve -e trace=execve -e signal=none -s 65536 -o "$EXECVE_LOG" bash scripts/demo.sh)
"$MB_TOOLS_VENV/bin/python" scripts/check_argv_secrets.py "$EXECVE_LOG" "$MB_CACHE/demo-keys.env"

say "contract fuzzing: scripts/schemathesis.sh against the stack the demo left running"
bash scripts/schemathesis.sh

say "real clients: OpenMeter's Node SDK and the CloudEvents Python SDK (scripts/openmeter_clients.sh)"
bash scripts/openmeter_clients.sh

say "local stack scripts (scripts/tests)"
for script_test in scripts/tests/*.sh; do bash "$script_test"; done

say "tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --test-threads "${TEST_THREADS:-8}"
else
  cargo test --workspace --locked --no-fail-fast
fi

# The date-sensitive tests again, as of the calendar's edges: the tests' clock
# (meterbridge::testing::clock) starts at MB_TEST_NOW, and the fixtures lay out the storage as
# of it. A Monday that is the first of a month; the last seconds of 29 February and of 31
# December (the runs cross midnight); the day whose 35-day ingestion window starts on 1 January.
# Left out: the tests that cut runs anywhere and race senders against rotations (their property
# does not depend on the date, and they are the suite's longest).
CALENDAR_EDGES="2027-03-01T00:00:30Z 2028-02-29T23:59:30Z 2027-12-31T23:59:40Z 2027-02-05T00:00:10Z"
for at in $CALENDAR_EDGES; do
  say "date-sensitive tests as of $at (MB_TEST_NOW)"
  if command -v cargo-nextest >/dev/null 2>&1; then
    MB_TEST_NOW=$at cargo nextest run --workspace --locked --no-fail-fast --test-threads "${TEST_THREADS:-8}" \
      --status-level fail -E '(package(aggregate-usage) | (package(ingest-usage) & (binary(corrections)
        | binary(limits) | binary(dedup_window) | binary(ingest) | test(the_window_is_bounded))))
        - test(cut_at_any_point) - test(no_duplicate_slips_between_generations)'
  else
    MB_TEST_NOW=$at cargo test --locked --no-fail-fast -p aggregate-usage --tests
    MB_TEST_NOW=$at cargo test --locked --no-fail-fast -p ingest-usage --test corrections --test limits \
      --test dedup_window --test ingest
  fi
done
