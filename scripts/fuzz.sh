#!/usr/bin/env bash
# Runs every libFuzzer target for SECONDS each (default 60), seeded from fuzz/seeds, with the
# corpus kept in fuzz/corpus. Needs a nightly toolchain; installs cargo-fuzz if missing.
# A crash leaves its input in fuzz/artifacts/TARGET and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=(frames openai_request certificate quote payment_message)
cargo +nightly fuzz build -O
mkdir -p fuzz/logs
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== $t (${seconds}s)"
  # The TDX vectors (licensed with shared/) seed the quote target from where they are.
  seeds="fuzz/seeds/$t"
  [ "$t" = quote ] && seeds="../shared/vectors/tdx"
  if ! cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "$seeds" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 >"fuzz/logs/$t.log" 2>&1; then
    tail -40 "fuzz/logs/$t.log"
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t" >&2
    exit 1
  fi
  grep -E '^Done' "fuzz/logs/$t.log"
done
