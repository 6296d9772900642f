"""Creates or updates the local stack's secrets in moto (run with the tools virtualenv's python).

Usage: seed_secrets.py NAME=JSON [NAME=JSON ...]
Each secret is created when missing and given a new value otherwise, as a rotation would.
"""
import json
import sys

import boto3

client = boto3.client("secretsmanager")
for arg in sys.argv[1:]:
    name, _, value = arg.partition("=")
    json.loads(value)  # refuse anything that is not JSON
    try:
        client.create_secret(Name=name, SecretString=value)
        print(f"created secret {name}")
    except client.exceptions.ResourceExistsException:
        client.put_secret_value(SecretId=name, SecretString=value)
        print(f"updated secret {name}")
