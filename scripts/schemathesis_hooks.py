"""Schemathesis hooks for scripts/schemathesis.sh: sign the provider webhooks it generates.

Without a valid `stripe-signature` every generated webhook stops at the signature check (401);
signed with the fuzzing tenant's secret, they reach the event parsing and the payment
transitions behind it. The body is signed exactly as Schemathesis sends it (`json.dumps`), as
Stripe does: HMAC-SHA256 over "<t>.<body>".
"""
import hashlib
import hmac
import json
import os
import time

import schemathesis

WEBHOOK_PATH = "/v1/webhooks/{provider}/{tenant}"
SECRET = os.environ["MB_FUZZ_WEBHOOK_SECRET"]
TENANT = os.environ["MB_FUZZ_TENANT"]


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.operation.path != WEBHOOK_PATH or not isinstance(case.path_parameters, dict):
        return
    if not (case.media_type or "").startswith("application/json"):
        return
    try:
        payload = json.dumps(case.body)
    except (TypeError, ValueError):
        return
    case.path_parameters["tenant"] = TENANT
    t = str(int(time.time()))
    signature = hmac.new(SECRET.encode(), f"{t}.{payload}".encode(), hashlib.sha256).hexdigest()
    case.headers = {**(case.headers or {}), "stripe-signature": f"t={t},v1={signature}"}
