"""Fills the {{PLACEHOLDERS}} of an events/ fixture and prints it (or, with --body, its body).

Usage: render_event.py [--body] [--stdin] FILE NAME=VALUE ...
Fixtures carry placeholders instead of keys and timestamps: {{INTERNAL_KEY}}, {{EXTERNAL_KEY}},
{{NOW}} (an RFC 3339 instant), {{TODAY}} (YYYY-MM-DD) and {{RUN}} (makes event ids unique).
NOW and TODAY default to the current time; use the output with `sam local invoke -e` or
`cargo lambda invoke --data-file`. Pass API keys with --stdin, as NAME=VALUE lines on standard
input (`printf 'INTERNAL_KEY=%s\n' "$KEY" | render_event.py --stdin FILE`): a key on the
command line is visible to every user of the machine in `ps`.
"""
import datetime
import json
import sys

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
print(event.get("body", "") if body_only else json.dumps(event))
