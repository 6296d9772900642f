"""Pretty-prints the demo's responses. Reads "STATUS BODY" (or a bare JSON body) on stdin.

Usage: demo_show.py ingest|realtime|events|keys
"""
import json
import sys

what = sys.argv[1]
text = sys.stdin.read().strip()
status, body = (text.split(" ", 1) if not text.startswith("{") else ("", text))
d = json.loads(body)

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
    for e in d["events"]:
        print("    %s  %-28s %4d  %s" % (e["occurredAt"], e["metric"], e["quantity"], e["eventId"]))
    print("  next page cursor:", d.get("nextCursor", "(last page)"))
elif what == "keys":
    for k in d["apiKeys"]:
        print("  %s  %-11s %-9s %s" % (k["prefix"], k["sourceService"], k["trust"], "revoked" if k["revokedAt"] else "active"))
