# Sourced by scripts/demo.sh: usage ingestion over HTTP (cargo lambda watch's lambda-url).
NOW_TS=$(date -u +%Y-%m-%dT%H:%M:%S.000Z)
render_body() { python3 scripts/render_event.py --body "events/ingest-usage/$1" "RUN=$RUN_ID" "NOW=$NOW_TS"; }
http() { api ingest-usage "$@"; } # METHOD PATH KEY [BODY]
summary() { python3 scripts/demo_show.py ingest "$@"; }

say "admin: a monthly usage limit on api.requests, thresholds 50/80/100 % (limits never refuse usage)"
admin "$(cat events/admin/usage-limits-set.json)" \
  | json_get '"  %(metric)s: %(limit)s a month, thresholds %(thresholds)s" % d["limit"]'

say "ingest-usage: POST /v1/usage/events (3 events, internal key)"
http POST /v1/usage/events "$INTERNAL_KEY" "$(render_body post-events.json)" | summary 200 accepted=3
say "ingest-usage: the same batch again — duplicates, nothing counted twice"
http POST /v1/usage/events "$INTERNAL_KEY" "$(render_body post-events.json)" | summary 200 accepted=0 duplicates=3
say "ingest-usage: a mixed batch — valid events are stored, the others rejected one by one"
http POST /v1/usage/events "$INTERNAL_KEY" "$(render_body post-events-mixed.json)" | summary 200 accepted=2 rejected=2
say "ingest-usage: an external key reporting a BILLABLE metric"
http POST /v1/usage/events "$EXTERNAL_KEY" "$(render_body post-events-external-billable.json)" | summary 200 accepted=1 rejected=1
say "ingest-usage: every event rejected — 422 problem+json"
http POST /v1/usage/events "$INTERNAL_KEY" "$(render_body post-events-all-rejected.json)" | summary 422 code=validation_failed
say "ingest-usage: a key that was revoked a moment ago"
REVOKED=$(admin "{\"action\":\"api-key.create\",\"tenant\":\"$TENANT\",\"source\":\"crm\",\"trust\":\"internal\"}")
admin "{\"action\":\"api-key.revoke\",\"prefix\":\"$(printf '%s' "$REVOKED" | json_get 'd["apiKey"]["prefix"]')\"}" >/dev/null
http POST /v1/usage/events "$(printf '%s' "$REVOKED" | json_get 'd["key"]')" "$(render_body post-events.json)" | summary 401 code=unauthorized
say "ingest-usage: GET /v1/usage/realtime (today's counters)"
http GET /v1/usage/realtime "$INTERNAL_KEY" | python3 scripts/demo_show.py realtime 200 source=redis
say "ingest-usage: GET /v1/usage/limits — what is left of the month (one Redis round trip)"
http GET /v1/usage/limits/api.requests "$INTERNAL_KEY" | python3 -c '
import json, sys
status, body = sys.stdin.read().split(" ", 1)
limit = json.loads(body)["limits"][0]
print("  %s %s: usage %s of %s, remaining %s, %s%%, reached %s, resets %s, from %s" % (status, limit["metric"], limit["usage"], limit["limit"], limit["remaining"], limit["percent"], limit["reached"], limit["resetsAt"], limit["source"]))
sys.exit(status != "200" or limit["source"] != "redis" or int(limit["usage"]) < 1)'
say "ingest-usage: GET /v1/usage/events — this run's events, 3 per page"
http GET "/v1/usage/events?limit=3&from=$NOW_TS" "$INTERNAL_KEY" | python3 scripts/demo_show.py events 200
say "ingest-usage: the same function through the Lambda invoke API (cargo lambda invoke)"
printf 'INTERNAL_KEY=%s\n' "$INTERNAL_KEY" | python3 scripts/render_event.py --stdin events/ingest-usage/realtime.json >"$MB_CACHE/realtime-event.json"
cargo lambda invoke ingest-usage --invoke-address 127.0.0.1 --invoke-port "$WATCH_PORT" --data-file "$MB_CACHE/realtime-event.json" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  statusCode", r["statusCode"], "source", json.loads(r["body"])["source"]); sys.exit(r["statusCode"] != 200)'
say "ingest-usage: a raw query string that is not a valid URI (a quote, a space) — 400, the container lives on"
python3 - "$MB_CACHE/realtime-event.json" >"$MB_CACHE/hostile-event.json" <<'PY'
import json, sys
event = json.load(open(sys.argv[1]))
event["rawQueryString"] = 'date="2026-11-25" x'
event["queryStringParameters"] = {"date": '"2026-11-25" x'}
print(json.dumps(event))
PY
for _ in 1 2; do
  curl -sS --max-time 60 -X POST "http://127.0.0.1:$WATCH_PORT/2015-03-31/functions/ingest-usage/invocations" \
    -H 'content-type: application/json' --data-binary @"$MB_CACHE/hostile-event.json" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); b=json.loads(r["body"]); print("  statusCode", r["statusCode"], b["code"]); sys.exit(r["statusCode"] != 400)'
done
rm -f "$MB_CACHE/hostile-event.json"
