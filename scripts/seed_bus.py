"""Creates the local stack's event bus in moto, with a rule that routes meterbridge's payment
events to an SQS queue, so that what the relay publishes can be read back. Idempotent.

Usage: seed_bus.py BUS_NAME   (run with the tools virtualenv's python); prints the queue URL.
"""
import json
import sys

import boto3

bus = sys.argv[1]
events = boto3.client("events")
sqs = boto3.client("sqs")
try:
    events.create_event_bus(Name=bus)
except events.exceptions.ResourceAlreadyExistsException:
    pass
queue_url = sqs.create_queue(QueueName=bus)["QueueUrl"]
arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
events.put_rule(Name=f"{bus}-to-queue", EventBusName=bus,
                EventPattern=json.dumps({"source": ["meterbridge.payments"]}))
events.put_targets(Rule=f"{bus}-to-queue", EventBusName=bus, Targets=[{"Id": "queue", "Arn": arn}])
print(queue_url)
