#!/usr/bin/env bash
# scripts/sam.sh builds only with the RDS CA bundle its committed pin names: with no pin, or a
# bundle whose SHA-256 differs from the pin, `build` stops before installing or building
# anything, and says how to pin.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
certs=$root/certs
saved=$(mktemp -d)
for f in rds-global-bundle.pem rds-global-bundle.pem.sha256; do
  [ -e "$certs/$f" ] && cp -p "$certs/$f" "$saved/$f"
done
restore() {
  rm -f "$certs/rds-global-bundle.pem" "$certs/rds-global-bundle.pem.sha256"
  for f in rds-global-bundle.pem rds-global-bundle.pem.sha256; do
    [ -e "$saved/$f" ] && cp -p "$saved/$f" "$certs/$f"
  done
  rm -rf "$saved"
}
trap restore EXIT

rm -f "$certs/rds-global-bundle.pem.sha256"
printf -- '-----BEGIN CERTIFICATE-----\nnot the pinned bundle\n-----END CERTIFICATE-----\n' >"$certs/rds-global-bundle.pem"
if out=$(bash "$root/scripts/sam.sh" build 2>&1); then
  echo "FAIL: sam.sh build ran with no pin" >&2; exit 1
fi
grep -q "no RDS CA bundle is pinned" <<<"$out" || { echo "FAIL: unclear message: $out" >&2; exit 1; }

echo "0000000000000000000000000000000000000000000000000000000000000000" >"$certs/rds-global-bundle.pem.sha256"
if out=$(bash "$root/scripts/sam.sh" build 2>&1); then
  echo "FAIL: sam.sh build used a bundle that does not match its pin" >&2; exit 1
fi
grep -q "does not match the SHA-256 pinned" <<<"$out" || { echo "FAIL: unclear message: $out" >&2; exit 1; }
echo "ok: sam.sh build refuses an unpinned or mismatched RDS CA bundle before building anything"
