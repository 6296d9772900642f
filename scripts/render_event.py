"""Fills the {{PLACEHOLDERS}} of an events/ fixture and prints it (or, with --body, its body).

Usage: render_event.py [--body] [--stdin] FILE NAME=VALUE ...
Fixtures carry placeholders instead of keys and timestamps: {{INTERNAL_KEY}}, {{EXTERNAL_KEY}},
{{NOW}} (an RFC 3339 instant), {{TODAY}} (YYYY-MM-DD), {{RUN}} (makes ids unique), {{PAYMENT_ID}},
{{TENANT_SLUG}}. A webhook fixture's {{STRIPE_SIGNATURE}} is computed, as Stripe does, over the
rendered body with the secret given as STRIPE_SECRET (on standard input).
NOW and TODAY default to the current time; use the output with `sam local invoke -e` or
`cargo lambda invoke --data-file`. Pass API keys with --stdin, as NAME=VALUE lines on standard
input (`printf 'INTERNAL_KEY=%s\n' "$KEY" | render_event.py --stdin FILE`): a key on the
command line is visible to every user of the machine in `ps`.
"""
import datetime
import hashlib
import hmac
import json
import sys
import time

args = sys.argv[1:]
body_only = "--body" in args
from_stdin = "--stdin" in args
args = [a for a in args if a not in ("--body", "--stdin")]
path, pairs = args[0], args[1:]
now = datetime.datetime.now(datetime.timezone.utc)
values = {"NOW": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "TODAY": now.date().isoformat()}
values.update(pair.split("=", 1) for pair in pairs)
if from_stdin:
    values.update(line.rstrip("\n").split("=", 1) for line in sys.stdin if "=" in line)
text = open(path).read()
for name, value in values.items():
    text = text.replace("{{" + name + "}}", value)
event = json.loads(text)
headers = event.get("headers", {})
if headers.get("stripe-signature") == "{{STRIPE_SIGNATURE}}":
    secret = values.get("STRIPE_SECRET")
    if not secret:
        sys.exit("this fixture is a signed webhook: give STRIPE_SECRET on standard input (--stdin)")
    t = str(int(time.time()))
    mac = hmac.new(secret.encode(), (t + "." + event["body"]).encode(), hashlib.sha256).hexdigest()
    headers["stripe-signature"] = f"t={t},v1={mac}"
print(event.get("body", "") if body_only else json.dumps(event))
