"""Fills the {{PLACEHOLDERS}} of an events/ fixture and prints it (or, with --body, its body).

Usage: render_event.py [--body] FILE NAME=VALUE ...
Fixtures carry placeholders instead of keys and timestamps: {{INTERNAL_KEY}}, {{EXTERNAL_KEY}},
{{NOW}} (an RFC 3339 instant), {{TODAY}} (YYYY-MM-DD) and {{RUN}} (makes event ids unique).
NOW and TODAY default to the current time; use the output with `sam local invoke -e` or
`cargo lambda invoke --data-file`.
"""
import datetime
import json
import sys

args = sys.argv[1:]
body_only = args[:1] == ["--body"]
if body_only:
    args = args[1:]
path, pairs = args[0], args[1:]
now = datetime.datetime.now(datetime.timezone.utc)
values = {"NOW": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "TODAY": now.date().isoformat()}
values.update(pair.split("=", 1) for pair in pairs)
text = open(path).read()
for name, value in values.items():
    text = text.replace("{{" + name + "}}", value)
event = json.loads(text)
print(event.get("body", "") if body_only else json.dumps(event))
