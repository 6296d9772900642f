# Sourced by scripts/demo.sh: the outbox relay publishes to EventBridge (moto), and the events
# are read back from the SQS queue a rule routes them to.
say "outbox-relay: one scheduled run (events/outbox-relay/scheduled.json) — the verification's event went out on the fast path already"
invoke outbox-relay "$(cat events/outbox-relay/scheduled.json)" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  claimed %d, published %d, dead %d, backlog %d" % (r["claimed"], r["published"], r["dead"], r["pending"]))'

say "admin: refund the payment (payment.refund) — its payment.refunded waits in the outbox for the relay"
admin "{\"action\":\"payment.refund\",\"tenant\":\"$TENANT\",\"paymentId\":\"$PAYMENT_ID\",\"reason\":\"demo refund\"}" \
  | python3 scripts/demo_show.py payment "" outcome=applied payment.status=REFUNDED
admin '{"action":"outbox.status"}' \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print("  outbox: pending %d, due %d, published %d, dead %d, oldest pending %.1f s" % (d["pending"], d["due"], d["published"], d["dead"], d["oldestPendingAgeSeconds"]))'
invoke outbox-relay "$(cat events/outbox-relay/scheduled.json)" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  relay: claimed %d, published %d" % (r["claimed"], r["published"])); sys.exit(r["published"] < 1)'

say "EventBridge → SQS: the payment's events, read back from the queue"
"$MB_TOOLS_VENV/bin/python" scripts/read_queue.py "$EVENT_QUEUE_URL" "$PAYMENT_ID" payment.paid payment.refunded
