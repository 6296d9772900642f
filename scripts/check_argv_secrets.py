"""Fails when a secret appeared on a command line during the demo.

Usage: check_argv_secrets.py EXECVE_LOG KEYS_FILE   (run with the tools virtualenv's python)
EXECVE_LOG is `strace -f -b execve -e trace=execve` output of scripts/demo.sh: the argv of
every command the demo ran. A command line is visible to every user of the machine (`ps`,
/proc/PID/cmdline), so no API key and no database password may appear in one. The secrets are
the demo's API keys and webhook secret (KEYS_FILE, and anything shaped like a key) and the database passwords the
demo stored in Secrets Manager (moto).
"""
import json
import re
import sys

import boto3

log_path, keys_path = sys.argv[1], sys.argv[2]
secrets = {}
with open(keys_path) as keys:
    for line in keys:
        name, _, value = line.strip().partition("=")
        if name.endswith(("_KEY", "_SECRET")) and value:
            secrets[value] = name
client = boto3.client("secretsmanager")
for name in ("meterbridge/local/db-admin", "meterbridge/local/db-ingest",
             "meterbridge/local/db-payments", "meterbridge/local/db-ops"):
    password = json.loads(client.get_secret_value(SecretId=name)["SecretString"])["password"]
    secrets[password] = f"the password in {name}"

key_shape = re.compile(r"mbk_[0-9a-f]{12}_[0-9a-f]{64}")
leaks = []
commands = 0
with open(log_path, errors="replace") as log:
    for line in log:
        if "execve(" not in line:
            continue
        commands += 1
        program = line.split("execve(", 1)[1].split(",", 1)[0]
        for value, what in secrets.items():
            if value in line:
                leaks.append(f"{what} on the command line of {program}")
        if key_shape.search(line) and not any(v in line for v in secrets):
            leaks.append(f"an API key on the command line of {program}")
if commands < 20:
    sys.exit(f"only {commands} commands in {log_path}: the demo was not traced")
if leaks:
    sys.exit("secrets on command lines (visible in ps):\n  " + "\n  ".join(sorted(set(leaks))))
print(f"no secret on any of the demo's {commands} command lines")
