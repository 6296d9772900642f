"""The CloudEvents Python SDK (PyPI `cloudevents`) against meterbridge's OpenMeter-compatible API:
events built and serialised by the SDK (structured content mode, JSON format) and posted as
one event and as a batch, replayed, a conflicting resend refused whole; the meter's usage read
back through GET /api/v1/meters/{slug}/query. Prints the total it sent, as JSON, for the caller
to check against /v1/usage/summary.

Environment: MB_URL, MB_KEY, MB_RUN, MB_METER, MB_TYPE (as for openmeter_sdk.mjs).
"""
import datetime
import json
import os
import urllib.error
import urllib.parse
import urllib.request

from cloudevents.core.bindings.http import to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

URL, KEY, RUN = os.environ["MB_URL"], os.environ["MB_KEY"], os.environ["MB_RUN"]
METER, TYPE = os.environ["MB_METER"], os.environ["MB_TYPE"]
FORMAT = JSONFormat()
NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def call(method, path, body=None, headers=None):
    """(status, parsed body or None, headers) of one request."""
    request = urllib.request.Request(URL + path, data=body, method=method)
    request.add_header("authorization", f"Bearer {KEY}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if raw else None), response.headers
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, (json.loads(raw) if raw else None), error.headers


def event(n, tokens, model=None):
    return CloudEvent(
        attributes={"type": TYPE, "source": "cloudevents-python-sdk", "id": f"{RUN}-py-{n}",
                    "subject": f"customer-{n % 2}", "time": NOW},
        data={"tokens": tokens, "model": model or ("big" if n % 2 else "small")},
    )


def post_one(e):
    message = to_structured(e, FORMAT)
    return call("POST", "/api/v1/events", message.body, message.headers)


def post_batch(events):
    body = "[" + ",".join(FORMAT.write(e).decode() for e in events) + "]"
    return call("POST", "/api/v1/events", body.encode(),
                {"content-type": "application/cloudevents-batch+json"})


def expect(got, status, what):
    assert got[0] == status, f"{what}: {got[0]} {got[1]}"
    return got


single = event(0, 7)
batch = [event(n, n * 10) for n in range(1, 21)]
expected = 7 + 10 * (20 * 21 // 2)

expect(post_one(single), 204, "one event")
expect(post_batch(batch), 204, "a batch")
expect(post_one(single), 204, "a replayed event")
expect(post_batch(batch), 204, "a replayed batch")
# The same id and source with other data: refused whole, nothing of the request stored.
_, problem, headers = expect(post_batch([event(100, 1), event(1, 99_999)]), 409, "a conflict")
assert headers.get("content-type") == "application/problem+json", dict(headers)
assert problem["code"] == "conflicting_events" and problem["errors"][0]["index"] == 1, problem
# No meter for the type: refused whole, naming the event.
wrong = CloudEvent(attributes={"type": "no-such-meter", "source": "cloudevents-python-sdk",
                               "id": f"{RUN}-py-x"}, data={})
_, problem, _ = expect(post_one(wrong), 400, "an unmapped type")
assert problem["errors"][0]["code"] == "unmapped_event_type", problem

def query(**params):
    q = urllib.parse.urlencode(params, doseq=True)
    return expect(call("GET", f"/api/v1/meters/{METER}/query?{q}"), 200, f"query {q}")[1]

span = {"from": (NOW - datetime.timedelta(minutes=5)).isoformat().replace("+00:00", "Z"),
        "to": (NOW + datetime.timedelta(minutes=5)).isoformat().replace("+00:00", "Z")}
total = query(**span)
assert [row["value"] for row in total["data"]] == [expected], total
per_subject = query(**span, groupBy=["subject", "model"], windowSize="DAY")
by_key = {}
for row in per_subject["data"]:
    key = (row["subject"], row["groupBy"]["model"])
    by_key[key] = by_key.get(key, 0) + row["value"]
# Even ids are customer-0 and small, odd ones customer-1 and big.
assert by_key == {("customer-0", "small"): 7 + 10 * (2 + 4 + 6 + 8 + 10 + 12 + 14 + 16 + 18 + 20),
                  ("customer-1", "big"): 10 * (1 + 3 + 5 + 7 + 9 + 11 + 13 + 15 + 17 + 19)}, by_key
print(json.dumps({"client": "cloudevents (Python)", "events": 21, "total": expected}))
