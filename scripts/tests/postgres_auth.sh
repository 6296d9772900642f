#!/usr/bin/env bash
# ensure_postgres (scripts/lib.sh) never weakens the authentication of a PostgreSQL cluster it did
# not create: pointed at a password-protected cluster, it stops with a clear message and leaves
# that cluster's pg_hba.conf, and every other cluster's, as they were.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "postgres_auth.sh: run as root (it starts a private cluster as user postgres)" >&2; exit 1; }
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
su postgres -c "$bin/pg_ctl -D $dir/data -o '-p $port -c listen_addresses=127.0.0.1 -k $dir' -w start" >/dev/null

checksums() { sha256sum "$dir/data/pg_hba.conf" /etc/postgresql/*/main/pg_hba.conf 2>/dev/null; }
before=$(checksums)
if out=$(PG_PORT=$port bash -c "source '$root/scripts/lib.sh'; ensure_postgres" 2>&1); then
  echo "FAIL: ensure_postgres accepted a cluster that refuses passwordless access:" >&2
  echo "$out" >&2
  exit 1
fi
grep -q "refuses user postgres without a password" <<<"$out" || { echo "FAIL: unclear message: $out" >&2; exit 1; }
[ "$(checksums)" = "$before" ] || { echo "FAIL: a pg_hba.conf was rewritten" >&2; exit 1; }
echo "ok: ensure_postgres left a password-protected cluster's authentication alone"
