#!/usr/bin/env bash
# The published contract (openapi.yaml) against the running local stack: Schemathesis generates
# requests from the spec — its examples, boundary values, random and invalid data, and the
# create → get → verify links — sends them through a local stand-in for API Gateway
# (scripts/apigw.py) to the functions under `cargo lambda watch`, and
# checks that no answer is a 5xx and that every status, content type and body is the one the spec
# declares. Needs scripts/demo.sh to have run (it leaves the functions running). The run is
# reproducible: a fixed seed, a bounded number of examples per operation, no example database.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MB_ROOT"
ensure_contract_venv

FUZZ_TENANT=${FUZZ_TENANT:-schemathesis}
FUZZ_SEED=${FUZZ_SEED:-20261125}
FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-20}
APIGW_PORT=${APIGW_PORT:-9001}
KEY_FILE=$MB_CACHE/schemathesis-key.env

curl -s -o /dev/null "http://127.0.0.1:$WATCH_PORT/" || {
  echo "nothing answers on :$WATCH_PORT: run scripts/demo.sh first (it starts cargo lambda watch)" >&2
  exit 1
}

say "schemathesis: tenant $FUZZ_TENANT and an internal API key (the previous one is revoked)"
if ! admin '{"action":"tenant.list"}' | json_get "any(t['slug'] == '$FUZZ_TENANT' for t in d['tenants'])" | grep -q True; then
  admin "{\"action\":\"tenant.create\",\"slug\":\"$FUZZ_TENANT\",\"name\":\"Schemathesis\"}" >/dev/null
fi
if [ -f "$KEY_FILE" ]; then
  admin "{\"action\":\"api-key.revoke\",\"prefix\":\"$(sed -n 's/^MB_FUZZ_PREFIX=//p' "$KEY_FILE")\"}" >/dev/null 2>&1 || true
fi
# A meter and a usage limit (those of the demo's admin fixtures), so that the meter query and the
# limits of the spec's example paths reach the handlers' logic rather than a 404.
for fixture in meter-set usage-limits-set; do
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["tenant"]=sys.argv[2]; print(json.dumps(d))' \
    "events/admin/$fixture.json" "$FUZZ_TENANT" | { read -r payload; admin "$payload" >/dev/null; }
done
# A source of its own per run: idempotency records are kept per (tenant, source), and a
# generated Idempotency-Key seen by an earlier run would replay that run's response, in the
# shape the API had then.
FUZZ_SOURCE=schemathesis-$(date +%s)
KEY=$(admin "{\"action\":\"api-key.create\",\"tenant\":\"$FUZZ_TENANT\",\"source\":\"$FUZZ_SOURCE\",\"trust\":\"internal\"}")
umask 077
{
  echo "MB_FUZZ_KEY=$(printf '%s' "$KEY" | json_get 'd["key"]')"
  echo "MB_FUZZ_PREFIX=$(printf '%s' "$KEY" | json_get 'd["apiKey"]["prefix"]')"
} >"$KEY_FILE"
set -a; source "$KEY_FILE"; set +a

say "schemathesis: a Stripe signing secret for $FUZZ_TENANT (Secrets Manager), so generated webhooks can be signed"
ensure_moto
# Kept from run to run: a running verify-payment caches the secret it read.
MB_FUZZ_WEBHOOK_SECRET=$(sed -n 's/^MB_FUZZ_WEBHOOK_SECRET=//p' "$MB_CACHE/schemathesis-webhook.env" 2>/dev/null || true)
if [ -z "$MB_FUZZ_WEBHOOK_SECRET" ]; then
  MB_FUZZ_WEBHOOK_SECRET=whsec_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "MB_FUZZ_WEBHOOK_SECRET=$MB_FUZZ_WEBHOOK_SECRET" >"$MB_CACHE/schemathesis-webhook.env"
fi
printf 'meterbridge/local/webhooks/stripe/%s={"signingSecrets":["%s"]}\n' "$FUZZ_TENANT" "$MB_FUZZ_WEBHOOK_SECRET" \
  | "$MB_TOOLS_VENV/bin/python" scripts/seed_secrets.py
export MB_FUZZ_WEBHOOK_SECRET MB_FUZZ_TENANT=$FUZZ_TENANT SCHEMATHESIS_HOOKS=scripts.schemathesis_hooks

say "API Gateway stand-in (scripts/apigw.py) on :$APIGW_PORT, routing template.yaml's HttpApi events"
"$MB_CONTRACT_VENV/bin/python" scripts/apigw.py "$APIGW_PORT" "$WATCH_PORT" template.yaml >"$MB_CACHE/apigw.log" 2>&1 &
GATEWAY_PID=$!
trap 'kill $GATEWAY_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$APIGW_PORT/" && break; sleep 0.1; done

REPORTS=$MB_CACHE/schemathesis
rm -rf "$REPORTS"
say "schemathesis: every operation of openapi.yaml — seed $FUZZ_SEED, at most $FUZZ_EXAMPLES examples per operation and phase"
"$MB_CONTRACT_VENV/bin/schemathesis" --no-color --config-file scripts/schemathesis.toml run openapi.yaml \
  --url "http://127.0.0.1:$APIGW_PORT" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --seed "$FUZZ_SEED" --max-examples "$FUZZ_EXAMPLES" --generation-database none --workers 1 \
  --request-timeout 30 --suppress-health-check too_slow \
  --report junit --report-junit-path "$REPORTS/junit.xml"
