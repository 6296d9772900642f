"""Reads (and deletes) the messages on the local bus's queue and prints the events for one
aggregate; fails unless exactly the expected event types arrived.

Usage: read_queue.py QUEUE_URL AGGREGATE_ID EVENT_TYPE [EVENT_TYPE ...]
"""
import json
import sys
import time

import boto3

queue_url, aggregate, expected = sys.argv[1], sys.argv[2], sys.argv[3:]
sqs = boto3.client("sqs")
found = []
deadline = time.time() + 5
while time.time() < deadline and len(found) < len(expected):
    batch = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    for m in batch:
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
        envelope = json.loads(m["Body"])
        if envelope["detail"].get("aggregateId") == aggregate:
            found.append(envelope)
types = [e["detail-type"] for e in found]
if sorted(types) != sorted(expected):
    sys.exit(f"  UNEXPECTED: events on the queue for {aggregate}: {types}, expected {expected}")
for e in found:
    print(json.dumps({k: e[k] for k in ("source", "detail-type", "time")}, indent=None))
    print(json.dumps(e["detail"], indent=2))
