"""Reads "ROLE PASSWORD" lines on standard input and prints, for each, an ALTER ROLE statement
that sets the password as a SCRAM-SHA-256 verifier computed here, as psql's \\password does: the
password itself never reaches the server, so no server log (log_statement = ddl) can show it.

The verifier is PostgreSQL's format (RFC 5802 / RFC 7677, 4096 iterations):
SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, each part base64.
"""
import base64
import hashlib
import hmac
import os
import re
import sys

ITERATIONS = 4096


def verifier(password: str) -> str:
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda b: base64.b64encode(b).decode("ascii")
    return "SCRAM-SHA-256$%d:%s$%s:%s" % (ITERATIONS, b64(salt), b64(stored_key), b64(server_key))


for line in sys.stdin:
    if not line.strip():
        continue
    role, password = line.rstrip("\n").split(" ", 1)
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", role):
        sys.exit("not a role name: %r" % role)
    # SASLprep leaves printable ASCII as it is; the demo's passwords are hex.
    if not re.fullmatch(r"[\x21-\x7e]+", password):
        sys.exit("only printable ASCII passwords are hashed here")
    print("ALTER ROLE %s PASSWORD '%s';" % (role, verifier(password)))
