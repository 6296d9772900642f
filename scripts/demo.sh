#!/usr/bin/env bash
# Command 1: brings the whole system up locally and drives every function.
#
#   PostgreSQL, Redis and moto are started (or installed) when missing; the secrets are written to
#   moto; every function runs under `cargo lambda watch` (the Lambda runtime emulator) and reads
#   its credentials from Secrets Manager exactly as it does in AWS. Safe to run again.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MB_ROOT"

DB_NAME=${MB_DB_NAME:-meterbridge}
TENANT=${DEMO_TENANT:-demo}
KEYS_FILE=$MB_CACHE/demo-keys.env
export SQLX_OFFLINE=true
unset DATABASE_URL REDIS_URL   # functions must use their secrets
export PATH="$MB_TOOLS_VENV/bin:$PATH"

ensure_services

say "database $DB_NAME"
if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -Atc "select 1 from pg_database where datname = '$DB_NAME'" | grep -q 1; then
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "create database $DB_NAME"
fi

secret_json() { # username password
  printf '{"engine":"postgres","host":"%s","port":%s,"dbname":"%s","username":"%s","password":"%s"}' \
    "$PG_HOST" "$PG_PORT" "$DB_NAME" "$1" "$2"
}
new_password() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

say "secrets in moto (Secrets Manager)"
# Secrets travel on standard input, never on a command line (visible to all in `ps`).
{
  printf 'meterbridge/local/db-admin=%s\n' "$(secret_json postgres "$(new_password)")"
  printf 'meterbridge/local/redis={"url":"redis://127.0.0.1:%s"}\n' "$REDIS_PORT"
} | "$MB_TOOLS_VENV/bin/python" scripts/seed_secrets.py

say "event bus meterbridge-local in moto, routed by a rule to an SQS queue"
EVENT_QUEUE_URL=$("$MB_TOOLS_VENV/bin/python" scripts/seed_bus.py meterbridge-local)
echo "  queue $EVENT_QUEUE_URL"

say "subject-export bucket meterbridge-local-exports in moto (S3)"
"$MB_TOOLS_VENV/bin/python" scripts/seed_bucket.py meterbridge-local-exports >/dev/null

say "cargo lambda watch on :$WATCH_PORT (log: $MB_CACHE/watch.log)"
# Restart it, so the functions run the code as it is now.
if [ -f "$MB_CACHE/watch.pid" ]; then kill "$(cat "$MB_CACHE/watch.pid")" 2>/dev/null || true; sleep 0.5; fi
if curl -s -o /dev/null "http://127.0.0.1:$WATCH_PORT/"; then
  echo "port $WATCH_PORT is taken by another process; stop it or set WATCH_PORT" >&2
  exit 1
fi
cargo build --quiet --workspace --bins
nohup cargo lambda watch --ignore-changes --invoke-address 127.0.0.1 --invoke-port "$WATCH_PORT" \
  >"$MB_CACHE/watch.log" 2>&1 &
echo $! >"$MB_CACHE/watch.pid"
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$WATCH_PORT/" && break; sleep 0.2; done
if ! kill -0 "$(cat "$MB_CACHE/watch.pid")" 2>/dev/null; then
  echo "cargo lambda watch did not start (is port $WATCH_PORT taken? set WATCH_PORT); see $MB_CACHE/watch.log" >&2
  exit 1
fi


say "admin: migrate"
admin "$(cat events/admin/migrate.json)" | json_get '", ".join(str(m["version"]) + " " + m["description"] for m in d["migrations"])'

say "admin: usage storage policy (day partitions ahead, retention, dedup-key generations)"
admin "$(cat events/admin/usage-maintain.json)" | json_get '"%d actions: %s" % (len(d["actions"]), ", ".join(a["action"] + " " + a["object"] for a in d["actions"][:3]) + (" ..." if len(d["actions"]) > 3 else ""))'
admin "$(cat events/admin/usage-status.json)" | json_get '"%(dayPartitions)d day partitions %(firstDay)s..%(lastDay)s, key generation %(openGeneration)s of %(keyGenerations)d" % d["storage"]'

say "database roles of the functions (one per API function, one for the scheduled ones), with generated passwords"
INGEST_PASSWORD=$(new_password); PAYMENTS_PASSWORD=$(new_password); OPS_PASSWORD=$(new_password)
# Set as SCRAM verifiers computed here (as psql's \password does): no password reaches the
# server, so no server log can show one. They travel on standard input, never on a command line.
printf 'meterbridge_ingest %s\nmeterbridge_payments %s\nmeterbridge_ops %s\n' \
    "$INGEST_PASSWORD" "$PAYMENTS_PASSWORD" "$OPS_PASSWORD" \
  | python3 scripts/pg_scram.py | psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d "$DB_NAME" -q
{
  printf 'meterbridge/local/db-ingest=%s\n' "$(secret_json meterbridge_ingest "$INGEST_PASSWORD")"
  printf 'meterbridge/local/db-payments=%s\n' "$(secret_json meterbridge_payments "$PAYMENTS_PASSWORD")"
  printf 'meterbridge/local/db-ops=%s\n' "$(secret_json meterbridge_ops "$OPS_PASSWORD")"
} | "$MB_TOOLS_VENV/bin/python" scripts/seed_secrets.py

say "admin: tenant $TENANT"
if admin '{"action":"tenant.list"}' | json_get "any(t['slug'] == '$TENANT' for t in d['tenants'])" | grep -q True; then
  echo "tenant $TENANT exists"
else
  admin "{\"action\":\"tenant.create\",\"slug\":\"$TENANT\",\"name\":\"Demo Tenant\"}" | json_get 'd["tenant"]["id"]'
fi

say "admin: API keys (earlier demo keys are revoked)"
if [ -f "$KEYS_FILE" ]; then
  for prefix in $(sed -n 's/^[A-Z_]*_PREFIX=//p' "$KEYS_FILE"); do
    admin "{\"action\":\"api-key.revoke\",\"prefix\":\"$prefix\"}" >/dev/null 2>&1 || true
  done
fi
INTERNAL=$(admin "{\"action\":\"api-key.create\",\"tenant\":\"$TENANT\",\"source\":\"crm\",\"trust\":\"internal\"}")
EXTERNAL=$(admin "{\"action\":\"api-key.create\",\"tenant\":\"$TENANT\",\"source\":\"web-widget\",\"trust\":\"external\"}")
umask 077
STRIPE_WEBHOOK_SECRET=whsec_$(new_password)
{
  echo "INTERNAL_KEY=$(printf '%s' "$INTERNAL" | json_get 'd["key"]')"
  echo "INTERNAL_PREFIX=$(printf '%s' "$INTERNAL" | json_get 'd["apiKey"]["prefix"]')"
  echo "EXTERNAL_KEY=$(printf '%s' "$EXTERNAL" | json_get 'd["key"]')"
  echo "EXTERNAL_PREFIX=$(printf '%s' "$EXTERNAL" | json_get 'd["apiKey"]["prefix"]')"
  echo "STRIPE_WEBHOOK_SECRET=$STRIPE_WEBHOOK_SECRET"
} >"$KEYS_FILE"
admin "{\"action\":\"api-key.list\",\"tenant\":\"$TENANT\"}" | python3 scripts/demo_show.py keys

say "webhook signing secret for $TENANT's Stripe endpoint (Secrets Manager)"
printf 'meterbridge/local/webhooks/stripe/%s={"signingSecrets":["%s"]}\n' "$TENANT" "$STRIPE_WEBHOOK_SECRET" \
  | "$MB_TOOLS_VENV/bin/python" scripts/seed_secrets.py

RUN_ID=demo-$(date +%s)
# api FUNCTION METHOD PATH KEY [BODY] [HEADER ...] — calls a function's HTTP API through cargo
# lambda watch and prints "status body". The key and any extra header travel to curl in a file
# (mode 600), never on its command line.
HEADER_FILE=$(mktemp)
# It holds a key: removed however the demo ends, a failed step included.
trap 'rm -f "$HEADER_FILE"' EXIT
api() {
  local fn=$1 method=$2 path=$3 key=$4 body=${5-} out status
  {
    [ -n "$key" ] && printf 'authorization: Bearer %s\n' "$key"
    printf 'x-correlation-id: %s\n' "$RUN_ID"
    [ $# -gt 5 ] && printf '%s\n' "${@:6}"
  } >"$HEADER_FILE"
  out=$(mktemp)
  status=$(curl -sS -o "$out" -w '%{http_code}' -X "$method" "http://127.0.0.1:$WATCH_PORT/lambda-url/$fn$path" \
    -H @"$HEADER_FILE" -H 'content-type: application/json' ${body:+--data-binary "$body"})
  printf '%s %s\n' "$status" "$(cat "$out")"; rm -f "$out"
}

source "$KEYS_FILE"
for step in scripts/demo.d/*.sh; do
  [ -e "$step" ] || continue
  # shellcheck source=/dev/null
  source "$step"
done
rm -f "$HEADER_FILE"

cat <<SUMMARY

meterbridge is running locally:
  PostgreSQL  $PG_HOST:$PG_PORT/$DB_NAME     Redis 127.0.0.1:$REDIS_PORT     moto $AWS_ENDPOINT_URL
  functions   http://127.0.0.1:$WATCH_PORT (cargo lambda watch, pid $(cat "$MB_CACHE/watch.pid" 2>/dev/null || echo '?'))
  API keys    $KEYS_FILE (the keys are shown nowhere else)
  usage API   http://127.0.0.1:$WATCH_PORT/lambda-url/ingest-usage/v1/usage/{events,realtime,summary,limits}
  payments    http://127.0.0.1:$WATCH_PORT/lambda-url/verify-payment/v1/payments, .../v1/webhooks/stripe/$TENANT
Invoke the admin function:  cargo lambda invoke admin --invoke-address 127.0.0.1 --invoke-port $WATCH_PORT --data-file events/admin/tenant-list.json
Aggregate now:              cargo lambda invoke aggregate-usage --invoke-address 127.0.0.1 --invoke-port $WATCH_PORT --data-file events/aggregate-usage/scheduled.json
Stop the functions:         kill \$(cat $MB_CACHE/watch.pid)
SUMMARY
