"""Creates or updates the local stack's secrets in moto (run with the tools virtualenv's python).

Usage: seed_secrets.py < LINES   where each line is NAME=JSON
The values arrive on standard input, never on the command line, where `ps` would show them to
every user of the machine. Each secret is created when missing and given a new value otherwise,
as a rotation would.
"""
import json
import sys

import boto3

if len(sys.argv) > 1:
    sys.exit("seed_secrets.py reads NAME=JSON lines from standard input, not from arguments")
client = boto3.client("secretsmanager")
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    name, _, value = line.partition("=")
    json.loads(value)  # refuse anything that is not JSON
    try:
        client.create_secret(Name=name, SecretString=value)
        print(f"created secret {name}")
    except client.exceptions.ResourceExistsException:
        client.put_secret_value(SecretId=name, SecretString=value)
        print(f"updated secret {name}")
