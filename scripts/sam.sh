#!/usr/bin/env bash
# `sam` for this project on a fresh machine: `scripts/sam.sh build`, `scripts/sam.sh deploy
# --config-env prod`, any other SAM command alike. It installs the SAM CLI and cargo-lambda (in
# their virtualenvs under ~/.cache/meterbridge) when missing, and avoids the two traps that made
# `sam build` fail on a fresh machine:
#   - cargo-lambda finds zig with `python3 -m ziglang`: the cargo-lambda virtualenv (which has
#     ziglang) goes first on PATH, ahead of the SAM one;
#   - with `parallel = true` every function's build ran `rustup target add` at once and one failed
#     with E0463 (no std): the target is added once, here, before the builds start.
# A build uses the RDS certificate bundle in certs/ only as pinned: its SHA-256 must be the one in
# certs/rds-global-bundle.pem.sha256 (committed). `scripts/sam.sh pin-rds-ca` fetches the bundle
# AWS serves, lists what it holds and writes the pin, to review and commit (certs/README.md).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MB_ROOT"
RDS_CA_URL=https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem
RDS_CA=certs/rds-global-bundle.pem
RDS_CA_PIN=certs/rds-global-bundle.pem.sha256

fetch_rds_ca() { # FILE
  curl -fsS --proto '=https' --tlsv1.2 --max-time 60 -o "$1" "$RDS_CA_URL" \
    || { rm -f "$1"
         echo "could not download the RDS CA bundle from $RDS_CA_URL; put it at $RDS_CA (certs/README.md)" >&2
         exit 1; }
}

if [ "${1:-}" = pin-rds-ca ]; then
  command -v openssl >/dev/null || apt_install openssl
  fetch_rds_ca "$RDS_CA.new"
  say "the bundle AWS serves now: each certificate's subject"
  openssl crl2pkcs7 -nocrl -certfile "$RDS_CA.new" | openssl pkcs7 -print_certs -noout \
    | grep '^subject=' | sed 's/^/  /'
  awk '/BEGIN CERTIFICATE/ {n++} END {print "  " n " certificates"}' "$RDS_CA.new"
  mv "$RDS_CA.new" "$RDS_CA"
  sha256sum "$RDS_CA" | cut -d' ' -f1 >"$RDS_CA_PIN"
  say "pinned $(cat "$RDS_CA_PIN") in $RDS_CA_PIN: review the list above, then commit the pin"
  exit 0
fi

if [ "${1:-}" = build ]; then
  # The RDS CA bundle the DbCaBundleLayer carries, and only the one pinned (checked first:
  # nothing is installed or built for a bundle that would be refused).
  if [ ! -s "$RDS_CA_PIN" ]; then
    echo "no RDS CA bundle is pinned ($RDS_CA_PIN): run scripts/sam.sh pin-rds-ca, review what it" \
         "lists and commit the pin (certs/README.md)" >&2
    exit 1
  fi
  if [ ! -s "$RDS_CA" ]; then
    say "downloading the RDS certificate bundle into certs/"
    fetch_rds_ca "$RDS_CA"
  fi
  if [ "$(sha256sum "$RDS_CA" | cut -d' ' -f1)" != "$(tr -d ' \n' <"$RDS_CA_PIN")" ]; then
    echo "$RDS_CA does not match the SHA-256 pinned in $RDS_CA_PIN. AWS may have published a new" \
         "bundle: run scripts/sam.sh pin-rds-ca, review what it lists and commit the new pin." >&2
    exit 1
  fi
fi
ensure_tools_venv
ensure_sam_venv
if [ "${1:-}" = build ] && command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
    || rustup target add aarch64-unknown-linux-gnu
fi
export PATH="$MB_TOOLS_VENV/bin:$PATH"
exec "$MB_SAM_VENV/bin/sam" "$@"
