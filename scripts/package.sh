#!/usr/bin/env bash
# Builds every function for Lambda (arm64, release, with cargo-lambda and zig) and prints each
# artifact's size: the bootstrap binary and its zip, which is what Lambda loads at a cold start.
#   scripts/package.sh            # every function
#   scripts/package.sh admin ...  # some of them
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MB_ROOT"
ensure_tools_venv
export PATH="$MB_TOOLS_VENV/bin:$PATH" SQLX_OFFLINE=true
command -v rustup >/dev/null && { rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
  || rustup target add aarch64-unknown-linux-gnu; }

FUNCTIONS=("$@")
[ ${#FUNCTIONS[@]} -gt 0 ] || FUNCTIONS=(admin ingest-usage verify-payment outbox-relay aggregate-usage)
bins=()
for f in "${FUNCTIONS[@]}"; do bins+=(--bin "$f"); done
say "cargo lambda build --release --arm64 --output-format zip (${FUNCTIONS[*]})"
started=$(date +%s)
cargo lambda build --release --arm64 --output-format zip "${bins[@]}"
say "built in $(( $(date +%s) - started )) s"

out=$CARGO_TARGET_DIR/lambda
printf '%-18s %14s %14s\n' function "bootstrap (B)" "zip (B)"
for f in "${FUNCTIONS[@]}"; do
  zip=$out/$f/bootstrap.zip
  [ -f "$zip" ] || { echo "missing $zip" >&2; exit 1; }
  bin_size=$(python3 -c 'import sys, zipfile; print(zipfile.ZipFile(sys.argv[1]).getinfo("bootstrap").file_size)' "$zip")
  printf '%-18s %14s %14s\n' "$f" "$bin_size" "$(stat -c %s "$zip")"
done
