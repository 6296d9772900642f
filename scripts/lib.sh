# Shared helpers for the scripts in this folder: bring up what is missing, idempotently.
# Sourced, not run. Everything installed lives under $MB_CACHE (outside the clone) so that
# repeated runs, and CI on the same machine, reuse it.
set -euo pipefail

MB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MB_CACHE=${MB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meterbridge}
MB_TOOLS_VENV=$MB_CACHE/venv-tools   # moto server + cargo-lambda (+ boto3 for seeding secrets)
MB_SAM_VENV=$MB_CACHE/venv-sam       # aws-sam-cli + cfn-lint (pins an older boto3 than moto wants)
MB_CONTRACT_VENV=$MB_CACHE/venv-contract # openapi-spec-validator + schemathesis
MB_CLIENTS_VENV=$MB_CACHE/venv-clients   # the CloudEvents Python SDK (scripts/openmeter_clients.sh)
MB_CLIENTS_NODE=$MB_CACHE/clients-node   # OpenMeter's Node SDK, as pinned by scripts/clients/package-lock.json
MOTO_PORT=${MOTO_PORT:-5055}
MOTO_VERSION=5.2.6   # 5.2.1 answered CompleteMultipartUpload with a root element the SDKs reject
CARGO_LAMBDA_VERSION=1.9.2
SAM_VERSION=1.170.0
CFN_LINT_VERSION=1.58.0
SCHEMATHESIS_VERSION=4.32.5
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
CLOUDEVENTS_VERSION=2.2.0
PG_HOST=127.0.0.1
PG_PORT=${PG_PORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
WATCH_PORT=${WATCH_PORT:-9000}       # cargo lambda watch (scripts/demo.sh)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$MB_CACHE/target}
export AWS_ENDPOINT_URL=${AWS_ENDPOINT_URL:-http://127.0.0.1:$MOTO_PORT}
export AWS_REGION=${AWS_REGION:-us-east-1}
export AWS_DEFAULT_REGION=$AWS_REGION
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
export SAM_CLI_TELEMETRY=0
mkdir -p "$MB_CACHE"

say() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }

apt_install() {
  say "installing $* from Debian packages"
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; fi
}

ensure_postgres() {
  local created=0 v
  if ! pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
    if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
      apt_install postgresql postgresql-client
      created=1   # Debian's package creates the main cluster: this run made it
    fi
    v=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $v"
    pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
    for _ in $(seq 1 50); do pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && break; sleep 0.2; done
    pg_isready -h "$PG_HOST" -p "$PG_PORT" >/dev/null || { echo "PostgreSQL did not come up on $PG_HOST:$PG_PORT" >&2; exit 1; }
    # A fresh Debian cluster asks for passwords on TCP; the local stack uses trust auth like the
    # dev machines. Only a cluster this run created is changed, and only its own pg_hba.conf.
    if [ "$created" = 1 ] && ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -Atc 'select 1' >/dev/null 2>&1; then
      sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "/etc/postgresql/$v/main/pg_hba.conf"
      pg_ctlcluster --skip-systemctl-redirect "$v" main reload
    fi
  fi
  if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -Atc 'select 1' >/dev/null 2>&1; then
    echo "PostgreSQL at $PG_HOST:$PG_PORT refuses user postgres without a password. These scripts" \
         "change the authentication only of a cluster they created; give them access (PGPASSWORD" \
         "or ~/.pgpass) or point PG_PORT at a cluster with trust auth for 127.0.0.1." >&2
    exit 1
  fi
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis on $REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "Redis did not come up on $REDIS_PORT" >&2; exit 1
}

ensure_python_venv() {
  command -v curl >/dev/null || apt_install curl
  python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
}

TOOLS_PINS="moto[server]==$MOTO_VERSION cargo-lambda==$CARGO_LAMBDA_VERSION"

ensure_tools_venv() {
  # Installed, and at the pinned versions (a machine that ran an older pin upgrades in place).
  if [ -x "$MB_TOOLS_VENV/bin/moto_server" ] && [ -x "$MB_TOOLS_VENV/bin/cargo-lambda" ] \
     && [ "$(cat "$MB_TOOLS_VENV/pins" 2>/dev/null)" = "$TOOLS_PINS" ]; then return; fi
  ensure_python_venv
  say "installing moto[server] $MOTO_VERSION and cargo-lambda $CARGO_LAMBDA_VERSION into $MB_TOOLS_VENV"
  [ -x "$MB_TOOLS_VENV/bin/pip" ] || python3 -m venv "$MB_TOOLS_VENV"
  # shellcheck disable=SC2086
  "$MB_TOOLS_VENV/bin/pip" install -q --disable-pip-version-check $TOOLS_PINS
  printf '%s' "$TOOLS_PINS" >"$MB_TOOLS_VENV/pins"
}

ensure_sam_venv() {
  if [ -x "$MB_SAM_VENV/bin/sam" ] && [ -x "$MB_SAM_VENV/bin/cfn-lint" ]; then return; fi
  ensure_python_venv
  say "installing aws-sam-cli $SAM_VERSION and cfn-lint $CFN_LINT_VERSION into $MB_SAM_VENV"
  python3 -m venv "$MB_SAM_VENV"
  "$MB_SAM_VENV/bin/pip" install -q --disable-pip-version-check "aws-sam-cli==$SAM_VERSION" "cfn-lint==$CFN_LINT_VERSION"
}

ensure_contract_venv() {
  if [ -x "$MB_CONTRACT_VENV/bin/schemathesis" ] && [ -x "$MB_CONTRACT_VENV/bin/openapi-spec-validator" ] \
     && "$MB_CONTRACT_VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then return; fi
  ensure_python_venv
  say "installing schemathesis $SCHEMATHESIS_VERSION and openapi-spec-validator $OPENAPI_SPEC_VALIDATOR_VERSION into $MB_CONTRACT_VENV"
  python3 -m venv "$MB_CONTRACT_VENV"
  "$MB_CONTRACT_VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" \
    "openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION"
}

ensure_clients() {
  # OpenMeter's Node SDK at the version of scripts/clients/package-lock.json (npm ci: exactly the
  # locked tree), and the CloudEvents Python SDK.
  command -v npm >/dev/null || apt_install nodejs npm
  mkdir -p "$MB_CLIENTS_NODE"
  if ! cmp -s "$MB_ROOT/scripts/clients/package-lock.json" "$MB_CLIENTS_NODE/package-lock.json" \
     || [ ! -d "$MB_CLIENTS_NODE/node_modules/@openmeter/sdk" ]; then
    say "installing the OpenMeter Node SDK into $MB_CLIENTS_NODE"
    cp "$MB_ROOT/scripts/clients/package.json" "$MB_ROOT/scripts/clients/package-lock.json" "$MB_CLIENTS_NODE/"
    (cd "$MB_CLIENTS_NODE" && npm ci --no-audit --no-fund --loglevel=error)
  fi
  if [ -x "$MB_CLIENTS_VENV/bin/python" ] && [ "$("$MB_CLIENTS_VENV/bin/python" -c \
       'import importlib.metadata as m; print(m.version("cloudevents"))' 2>/dev/null)" = "$CLOUDEVENTS_VERSION" ]; then
    return
  fi
  ensure_python_venv
  say "installing cloudevents $CLOUDEVENTS_VERSION into $MB_CLIENTS_VENV"
  python3 -m venv "$MB_CLIENTS_VENV"
  "$MB_CLIENTS_VENV/bin/pip" install -q --disable-pip-version-check "cloudevents==$CLOUDEVENTS_VERSION"
}

moto_up() { curl -s -o /dev/null "http://127.0.0.1:$MOTO_PORT/moto-api/" 2>/dev/null; }

ensure_moto() {
  ensure_tools_venv
  # A server this script started from an older pin is replaced; any other one is used as is.
  if moto_up; then
    local pid
    pid=$(cat "$MB_CACHE/moto.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "$MB_CACHE/moto.version" 2>/dev/null)" != "$MOTO_VERSION" ] \
       && grep -q moto_server "/proc/$pid/cmdline" 2>/dev/null && kill "$pid" 2>/dev/null; then
      for _ in $(seq 1 50); do moto_up || break; sleep 0.1; done
    else
      return 0
    fi
  fi
  say "starting moto server $MOTO_VERSION on 127.0.0.1:$MOTO_PORT"
  nohup "$MB_TOOLS_VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$MB_CACHE/moto.log" 2>&1 &
  echo $! >"$MB_CACHE/moto.pid"
  printf '%s' "$MOTO_VERSION" >"$MB_CACHE/moto.version"
  for _ in $(seq 1 100); do moto_up && return; sleep 0.1; done
  echo "moto did not come up on $MOTO_PORT (see $MB_CACHE/moto.log)" >&2; exit 1
}

ensure_services() { ensure_postgres; ensure_redis; ensure_moto; }

# invoke FUNCTION JSON — invokes a function under `cargo lambda watch` (scripts/demo.sh) and
# prints its JSON response; fails on a function error.
invoke() {
  local out
  out=$(curl -sS --max-time 600 -X POST "http://127.0.0.1:$WATCH_PORT/2015-03-31/functions/$1/invocations" \
        -H 'content-type: application/json' -d "$2")
  if printf '%s' "$out" | grep -q '"errorType"'; then
    echo "$1 failed: $out" >&2; return 1
  fi
  printf '%s\n' "$out"
}
admin() { invoke admin "$1"; }
json_get() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
