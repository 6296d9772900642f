# Sourced by scripts/demo.sh: payments over HTTP — create, verify, a signed Stripe webhook — and
# the payment.paid event the verification wrote to the outbox.
pay() { api verify-payment "$@"; } # METHOD PATH KEY [BODY] [HEADER ...]
show_payment() { python3 scripts/demo_show.py payment "$@"; }
payment_body() { python3 scripts/render_event.py --body "events/verify-payment/$1" "RUN=$RUN_ID"; }

say "verify-payment: POST /v1/payments (Idempotency-Key create-$RUN_ID)"
CREATED=$(pay POST /v1/payments "$INTERNAL_KEY" "$(payment_body create-payment.json)" "idempotency-key: create-$RUN_ID")
printf '%s\n' "$CREATED" | show_payment 201 payment.status=PENDING
PAYMENT_ID=$(printf '%s' "${CREATED#* }" | json_get 'd["payment"]["id"]')
say "verify-payment: the same request and key again — the first response, replayed; one payment"
pay POST /v1/payments "$INTERNAL_KEY" "$(payment_body create-payment.json)" "idempotency-key: create-$RUN_ID" \
  | show_payment 201 payment.id="$PAYMENT_ID"
say "verify-payment: an external key may not verify — 403"
pay POST "/v1/payments/$PAYMENT_ID/verify" "$EXTERNAL_KEY" '{"verifiedBy":"partner","verificationMethod":"manual"}' \
  | show_payment 403
say "verify-payment: POST /v1/payments/{paymentId}/verify (internal key) — PAID_VERIFIED, payment.paid in the outbox"
pay POST "/v1/payments/$PAYMENT_ID/verify" "$INTERNAL_KEY" "$(payment_body verify-payment.json)" \
  | show_payment 200 outcome=applied payment.status=PAID_VERIFIED

say "verify-payment: Stripe's payment_intent.succeeded, signed with the tenant's secret — already verified"
printf 'STRIPE_SECRET=%s\nTENANT_SLUG=%s\n' "$STRIPE_WEBHOOK_SECRET" "$TENANT" \
  | python3 scripts/render_event.py --stdin events/verify-payment/webhook-payment-succeeded.json "RUN=$RUN_ID" \
  >"$MB_CACHE/webhook-event.json"
WEBHOOK_BODY=$(json_get 'd["body"]' <"$MB_CACHE/webhook-event.json")
WEBHOOK_SIGNATURE=$(json_get 'd["headers"]["stripe-signature"]' <"$MB_CACHE/webhook-event.json")
pay POST "/v1/webhooks/stripe/$TENANT" "" "$WEBHOOK_BODY" "stripe-signature: $WEBHOOK_SIGNATURE" \
  | show_payment 200 outcome=unchanged payment.verificationMethod=provider_api
say "verify-payment: the same delivery replayed — acknowledged, nothing changes"
pay POST "/v1/webhooks/stripe/$TENANT" "" "$WEBHOOK_BODY" "stripe-signature: $WEBHOOK_SIGNATURE" \
  | python3 scripts/demo_show.py payment 200 outcome=duplicate
say "verify-payment: the same body with a forged signature — 401"
pay POST "/v1/webhooks/stripe/$TENANT" "" "$WEBHOOK_BODY" "stripe-signature: t=$(date +%s),v1=$(printf '0%.0s' $(seq 64))" \
  | show_payment 401
rm -f "$MB_CACHE/webhook-event.json"

say "verify-payment: the outbox row the verification wrote (same transaction as the payment)"
psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d "$DB_NAME" -At -c \
  "SELECT jsonb_build_object('status', status, 'eventType', event_type, 'aggregateSequence', aggregate_sequence,
                             'envelope', payload)
     FROM outbox_events WHERE aggregate_id = '$PAYMENT_ID'" \
  | python3 -c 'import json,sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
if len(rows) != 1 or rows[0]["eventType"] != "payment.paid":
    sys.exit("  UNEXPECTED outbox rows: %r" % rows)
print(json.dumps(rows[0], indent=2))'
