"""Creates the local stack's subject-export bucket in moto (as SubjectExportBucket in
template.yaml: default encryption AES-256). Idempotent.

Usage: seed_bucket.py BUCKET_NAME   (run with the tools virtualenv's python).
"""
import sys

import boto3

bucket = sys.argv[1]
s3 = boto3.client("s3")
try:
    s3.create_bucket(Bucket=bucket)
except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
    pass
s3.put_bucket_encryption(
    Bucket=bucket,
    ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
    },
)
print(bucket)
