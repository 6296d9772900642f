#!/usr/bin/env bash
# scripts/pg_scram.py sets a role's password as a SCRAM verifier computed on the client: the
# role then logs in with that password on a cluster that asks for SCRAM, and the server's log
# (every statement logged) never shows the password.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "pg_scram.sh: run as root (it starts a private cluster as user postgres)" >&2; exit 1; }
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
dir=$(mktemp -d)
chown postgres "$dir"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/pw"
chown postgres "$dir/pw"
cleanup() {
  su postgres -c "$bin/pg_ctl -D $dir/data -m immediate stop" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
su postgres -c "$bin/initdb -D $dir/data -U postgres --auth=scram-sha-256 --pwfile=$dir/pw" >/dev/null
su postgres -c "$bin/pg_ctl -D $dir/data -l $dir/server.log -o '-p $port -c listen_addresses=127.0.0.1 -k $dir -c log_statement=all' -w start" >/dev/null
export PGPASSWORD
PGPASSWORD=$(cat "$dir/pw")
psql -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE ROLE demo_role LOGIN"
role_password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf 'demo_role %s\n' "$role_password" | python3 "$root/scripts/pg_scram.py" \
  | psql -h 127.0.0.1 -p "$port" -U postgres -q
PGPASSWORD=$role_password
[ "$(psql -h 127.0.0.1 -p "$port" -U demo_role -d postgres -Atc 'SELECT current_user')" = demo_role ] \
  || { echo "FAIL: demo_role did not log in with its password" >&2; exit 1; }
PGPASSWORD=wrong-$role_password
if psql -h 127.0.0.1 -p "$port" -U demo_role -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; then
  echo "FAIL: a wrong password logged in" >&2; exit 1
fi
grep -q "ALTER ROLE demo_role PASSWORD" "$dir/server.log" \
  || { echo "FAIL: the statement was not logged (the check below would prove nothing)" >&2; exit 1; }
if grep -q "$role_password" "$dir/server.log"; then
  echo "FAIL: the server log shows the password" >&2; exit 1
fi
echo "ok: a SCRAM verifier set from the client logs the role in, and the log never shows the password"
