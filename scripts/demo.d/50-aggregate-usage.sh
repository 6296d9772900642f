# Sourced by scripts/demo.sh: the aggregation (aggregate-usage, as meterbridge_ops) rolls the
# events up, the summary reads the rollups, a void corrects them, and the Redis counters heal
# after a flush.
aggregate() { # PAYLOAD-FILE — one job through the Lambda invoke API; prints its report
  invoke aggregate-usage "$(cat "events/aggregate-usage/$1")"
}
show_run() {
  python3 -c 'import json,sys
r=json.load(sys.stdin); c=r.get("counters") or {}
print("  %s: %d changes applied to %d cells in %d chunks; recomputed %d, written %d, unchanged %d; finalized %d; counters checked %d, drift %d, repaired %d" % (
  r["outcome"], r["collected"]["changes"], r["collected"]["cellsChanged"], r["collected"]["chunks"], r["cellsExamined"], r["cellsWritten"], r["cellsUnchanged"], r["finalized"],
  c.get("checked", 0), c.get("driftFound", 0), c.get("repaired", 0)))
sys.exit(r["outcome"] not in ("done", "skipped: locked") or bool(c.get("error")))'
}
show_summary() { # METRIC EXPECTED-TOTAL
  python3 -c 'import json,sys
status, body = sys.stdin.read().split(" ", 1); d=json.loads(body)
rows=[a for a in d["aggregates"] if a["metric"] == sys.argv[1]]
for a in d["aggregates"]:
    print("  %s %-32s total %-8s events %-4s actors %-3s final %-5s computed %s" % (a["periodStart"][:10], a["metric"], a["totalQuantity"], a["eventCount"], a["distinctActors"], a["final"], a["computedAt"]))
sys.exit(status != "200" or not rows or rows[-1]["totalQuantity"] != sys.argv[2])' "$@"
}
# The summary once the aggregation has applied everything written so far: a transaction open
# anywhere on the server (another database's too) holds the watermark back by design, so a run
# may leave the newest changes to the next one; run again, a few times, until the rollups match.
settled_summary() { # QUERY METRIC EXPECTED-TOTAL
  local out
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    if out=$(http GET "$1" "$INTERNAL_KEY" | show_summary "$2" "$3"); then
      echo "$out"
      return 0
    fi
    sleep 1
    aggregate scheduled.json >/dev/null
  done
  echo "$out"
  return 1
}
# The day of this run's events (NOW_TS, 20-ingest-usage.sh), not "today": a run across midnight
# UTC must still read the day it wrote.
DEMO_DAY=${NOW_TS:0:10}
realtime_total() { # METRIC — the demo day's counter from GET /v1/usage/realtime (and its source)
  http GET "/v1/usage/realtime?date=$DEMO_DAY" "$INTERNAL_KEY" \
    | python3 -c 'import json,sys; s,b=sys.stdin.read().split(" ",1); d=json.loads(b); print(d["counters"].get(sys.argv[1], 0), d["source"])' "$1"
}

say "aggregate-usage: a scheduled run (events/aggregate-usage/scheduled.json)"
aggregate scheduled.json | show_run
DEMO_TOTAL=$(psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d "$DB_NAME" -Atc \
  "select coalesce(sum(quantity), 0) from usage_events e join tenants t on t.id = e.tenant_id
    where t.slug = '$TENANT' and metric = 'api.requests' and voided_at is null
      and occurred_at >= '$DEMO_DAY' and occurred_at < date '$DEMO_DAY' + 1")
say "ingest-usage: GET /v1/usage/summary?period=daily (the demo day's rollups; api.requests = $DEMO_TOTAL in PostgreSQL)"
settled_summary "/v1/usage/summary?period=daily&from=$DEMO_DAY&to=$DEMO_DAY" api.requests "$DEMO_TOTAL"

say "ingest-usage: POST /v1/usage/events/$RUN_ID-evt-1/void (internal key) — kept, marked, uncounted"
echo "  real-time api.requests before: $(realtime_total api.requests)"
http POST "/v1/usage/events/$RUN_ID-evt-1/void" "$INTERNAL_KEY" '{"reason": "demo: sent twice upstream"}' \
  | python3 -c 'import json,sys; s,b=sys.stdin.read().split(" ",1); d=json.loads(b); e=d["event"]; print("  %s voidedNow=%s %s %s by %s: %s" % (s, d["voidedNow"], e["eventId"], e["quantity"], e["voidedBy"], e["voidReason"])); sys.exit(s != "200" or not d["voidedNow"])'
echo "  real-time api.requests after:  $(realtime_total api.requests)"
http POST "/v1/usage/events/$RUN_ID-evt-1/void" "$EXTERNAL_KEY" '{"reason": "a partner may not"}' | summary 403 code=forbidden
aggregate scheduled.json | show_run
VOIDED_TOTAL=$(psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d "$DB_NAME" -Atc \
  "select coalesce(sum(quantity), 0) from usage_events e join tenants t on t.id = e.tenant_id
    where t.slug = '$TENANT' and metric = 'api.requests' and voided_at is null
      and occurred_at >= '$DEMO_DAY' and occurred_at < date '$DEMO_DAY' + 1")
settled_summary "/v1/usage/summary?period=daily&from=$DEMO_DAY&to=$DEMO_DAY&metric=api.requests" api.requests "$VOIDED_TOTAL"

VOICE_TOTAL=$(psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d "$DB_NAME" -Atc \
  "select coalesce(sum(quantity), 0) from usage_events e join tenants t on t.id = e.tenant_id
    where t.slug = '$TENANT' and metric = 'voice.minutes.authorized' and voided_at is null
      and occurred_at >= '$DEMO_DAY' and occurred_at < date '$DEMO_DAY' + 1")
say "Redis FLUSHALL: the real-time counters are gone ..."
echo "  real-time voice.minutes.authorized before: $(realtime_total voice.minutes.authorized)"
redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
echo "  real-time voice.minutes.authorized after the flush: $(realtime_total voice.minutes.authorized)"
say "... and one aggregation run restores every counter in the window"
aggregate scheduled.json | show_run
HEALED=$(realtime_total voice.minutes.authorized)
echo "  real-time voice.minutes.authorized: $HEALED (PostgreSQL: $VOICE_TOTAL)"
[ "${HEALED%% *}" = "$VOICE_TOTAL" ] || { echo "counters not healed: $HEALED, PostgreSQL $VOICE_TOTAL" >&2; exit 1; }

say "aggregate-usage: backfill (events/aggregate-usage/backfill.json, for every tenant: this demo's is $TENANT) and status"
invoke aggregate-usage "{\"job\": \"backfill\", \"from\": \"$DEMO_DAY\", \"to\": \"$DEMO_DAY\", \"tenant\": \"$TENANT\", \"periods\": [\"daily\"]}" | show_run
aggregate status.json \
  | python3 -c 'import json,sys; d=json.load(sys.stdin)
for t in d["tenants"]: print("  %-20s last aggregated %s, queued %d, pending events %d" % (t["tenant"], t["lastAggregatedAt"], t["queuedCells"], t["pendingEvents"]))
print("  last run %s: %s" % (d["state"]["lastRunAt"], d["state"]["lastRun"]["outcome"]))'
