#!/usr/bin/env bash
# Real OpenMeter-ecosystem clients against the running local stack, unchanged: OpenMeter's
# official Node SDK (npm @openmeter/sdk) and the CloudEvents Python SDK (PyPI cloudevents), each
# through the API Gateway stand-in (scripts/apigw.py) with a tenant, key and meter of its own.
# Each ingests one event, a batch, and a replay of both (a conflicting resend and an unmapped
# type are refused whole), then reads its total back through GET /api/v1/meters/{slug}/query;
# here the same total must read back from the rollups, GET /v1/usage/summary, after the
# aggregation runs. Needs scripts/demo.sh to have run (it leaves the functions running).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MB_ROOT"
ensure_contract_venv
ensure_clients

CLIENTS_PORT=${CLIENTS_PORT:-9003}
RUN=clients-$(date +%s)
METRIC=api.requests

curl -s -o /dev/null "http://127.0.0.1:$WATCH_PORT/" || {
  echo "nothing answers on :$WATCH_PORT: run scripts/demo.sh first (it starts cargo lambda watch)" >&2
  exit 1
}

say "API Gateway stand-in (scripts/apigw.py) on :$CLIENTS_PORT"
"$MB_CONTRACT_VENV/bin/python" scripts/apigw.py "$CLIENTS_PORT" "$WATCH_PORT" template.yaml >"$MB_CACHE/apigw-clients.log" 2>&1 &
GATEWAY_PID=$!
trap 'kill $GATEWAY_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$CLIENTS_PORT/" && break; sleep 0.1; done

# summary_total KEY — the metric's total today (and yesterday, for a run across midnight) in the
# daily rollups. The key travels in the environment, never on a command line.
summary_total() {
  MB_KEY=$1 python3 - "http://127.0.0.1:$CLIENTS_PORT" "$METRIC" <<'PY'
import datetime, json, os, sys, urllib.request
url, metric = sys.argv[1], sys.argv[2]
today = datetime.datetime.now(datetime.timezone.utc).date()
q = f"period=daily&metric={metric}&from={today - datetime.timedelta(days=1)}&to={today}"
req = urllib.request.Request(f"{url}/v1/usage/summary?{q}", headers={"authorization": "Bearer " + os.environ["MB_KEY"]})
body = json.load(urllib.request.urlopen(req, timeout=30))
print(sum(int(a["totalQuantity"]) for a in body["aggregates"]))
PY
}

# client NAME COMMAND... — a tenant, an internal key and a meter for the client, the client run,
# then the rollups checked against the total it reports.
client() {
  local name=$1; shift
  local tenant=$RUN-$name type="$name.prompt" created key out expected got
  admin "{\"action\":\"tenant.create\",\"slug\":\"$tenant\",\"name\":\"$name client suite\"}" >/dev/null
  created=$(admin "{\"action\":\"api-key.create\",\"tenant\":\"$tenant\",\"source\":\"$name\",\"trust\":\"internal\"}")
  key=$(printf '%s' "$created" | json_get 'd["key"]')
  admin "{\"action\":\"meter.set\",\"tenant\":\"$tenant\",\"slug\":\"prompt_tokens\",\"eventType\":\"$type\",\"metric\":\"$METRIC\",\"valueProperty\":\"\$.tokens\",\"groupBy\":{\"model\":\"\$.model\"},\"reason\":\"client suite\"}" >/dev/null
  say "$name: ingest one event, a batch and a replay; read the meter back"
  out=$(MB_URL="http://127.0.0.1:$CLIENTS_PORT" MB_KEY=$key MB_RUN=$RUN MB_METER=prompt_tokens MB_TYPE=$type "$@")
  echo "  $out"
  expected=$(printf '%s' "$out" | json_get 'd["total"]')
  say "$name: the aggregation rolls the events up; /v1/usage/summary reads $expected"
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    invoke aggregate-usage "$(cat events/aggregate-usage/scheduled.json)" >/dev/null
    got=$(summary_total "$key")
    [ "$got" = "$expected" ] && break
    sleep 1
  done
  echo "  summary total $got"
  [ "$got" = "$expected" ] || { echo "$name: /v1/usage/summary reads $got, the client sent $expected" >&2; exit 1; }
  admin "{\"action\":\"api-key.revoke\",\"prefix\":\"$(printf '%s' "$created" | json_get 'd["apiKey"]["prefix"]')\"}" >/dev/null
}

cp scripts/clients/openmeter_sdk.mjs "$MB_CLIENTS_NODE/"
client node node "$MB_CLIENTS_NODE/openmeter_sdk.mjs"
client python "$MB_CLIENTS_VENV/bin/python" scripts/clients/cloudevents_sdk.py
say "real clients: OpenMeter Node SDK and CloudEvents Python SDK green"
