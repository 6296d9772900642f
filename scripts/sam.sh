#!/usr/bin/env bash
# `sam` for this project on a fresh machine: `scripts/sam.sh build`, `scripts/sam.sh deploy
# --config-env prod`, any other SAM command alike. It installs the SAM CLI and cargo-lambda (in
# their virtualenvs under ~/.cache/meterbridge) when missing, and avoids the two traps that made
# `sam build` fail on a fresh machine:
#   - cargo-lambda finds zig with `python3 -m ziglang`: the cargo-lambda virtualenv (which has
#     ziglang) goes first on PATH, ahead of the SAM one;
#   - with `parallel = true` every function's build ran `rustup target add` at once and one failed
#     with E0463 (no std): the target is added once, here, before the builds start.
# A build also fetches the RDS certificate bundle into certs/ when it is missing (certs/README.md).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MB_ROOT"
ensure_tools_venv
ensure_sam_venv
if [ "${1:-}" = build ]; then
  if command -v rustup >/dev/null; then
    rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
      || rustup target add aarch64-unknown-linux-gnu
  fi
  # The RDS CA bundle the DbCaBundleLayer carries (certs/README.md).
  if [ ! -s certs/rds-global-bundle.pem ]; then
    say "downloading the RDS certificate bundle into certs/"
    curl -fsS --max-time 60 -o certs/rds-global-bundle.pem \
      https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem \
      || { rm -f certs/rds-global-bundle.pem
           echo "could not download the RDS CA bundle; put it at certs/rds-global-bundle.pem (certs/README.md)" >&2
           exit 1; }
  fi
fi
export PATH="$MB_TOOLS_VENV/bin:$PATH"
exec "$MB_SAM_VENV/bin/sam" "$@"
