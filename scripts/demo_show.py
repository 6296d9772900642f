"""Pretty-prints the demo's responses. Reads "STATUS BODY" (or a bare JSON body) on stdin.

Usage: demo_show.py ingest|realtime|events|payment|keys [STATUS] [FIELD=VALUE ...]
With STATUS and FIELD=VALUE expectations (e.g. `ingest 200 accepted=3`), a response that differs
fails the demo, so the demo doubles as the end-to-end check that scripts/test.sh runs.
"""
import json
import sys

what = sys.argv[1]
expect_status = sys.argv[2] if len(sys.argv) > 2 else None
expect_fields = dict(arg.split("=", 1) for arg in sys.argv[3:])
text = sys.stdin.read().strip()
status, body = (text.split(" ", 1) if not text.startswith("{") else ("", text))
d = json.loads(body)


def fail(why):
    print("  UNEXPECTED: %s\n  response: %s %s" % (why, status, body), file=sys.stderr)
    sys.exit(1)


if expect_status and status != expect_status:
    fail("status %s, expected %s" % (status, expect_status))
def lookup(doc, dotted):
    for part in dotted.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


for field, value in expect_fields.items():
    if str(lookup(d, field)) != value:
        fail("%s is %r, expected %s" % (field, lookup(d, field), value))

if what == "ingest":
    if "results" in d:
        print("  HTTP %s: accepted %d, duplicates %d, conflicts %d, rejected %d"
              % (status, d["accepted"], d["duplicates"], d["conflicts"], d["rejected"]))
        for r in d["results"]:
            if r["status"] != "accepted":
                print("    #%d %-9s %s %s" % (r["index"], r["status"], r.get("code", ""), r.get("message", "")))
    else:
        print("  HTTP %s %s: %s" % (status, d.get("title"), d.get("detail")))
        for e in d.get("errors", []):
            print("    %s %s: %s" % (e["pointer"], e["code"], e["message"]))
elif what == "realtime":
    print("  %s, answered by %s:" % (d["date"], d["source"]))
    for metric, n in d["counters"].items():
        print("    %-32s %d" % (metric, n))
elif what == "events":
    if not d["events"]:
        fail("no events listed")
    for e in d["events"]:
        print("    %s  %-28s %4d  %s" % (e["occurredAt"], e["metric"], e["quantity"], e["eventId"]))
    print("  next page cursor:", d.get("nextCursor", "(last page)"))
elif what == "payment":
    p = d.get("payment")
    if p is None:
        head = ("HTTP %s " % status) if status else ""
        print("  %s%s: %s" % (head, d.get("title", d.get("outcome")), d.get("detail", "")))
    else:
        # An admin invocation answers with a bare body: no HTTP status to show.
        head = ("HTTP %s %s" % (status, d.get("outcome", ""))) if status else d.get("outcome", "")
        print("  %s: payment %s  %s %s  %s  v%d%s" % (
            head, p["id"], p["amountMinor"], p["currency"], p["status"],
            p["version"], ("  verified by %s (%s)" % (p["verifiedBy"], p["verificationMethod"])
                            if p.get("verifiedBy") else "")))
elif what == "keys":
    for k in d["apiKeys"]:
        print("  %s  %-11s %-9s %s" % (k["prefix"], k["sourceService"], k["trust"], "revoked" if k["revokedAt"] else "active"))
