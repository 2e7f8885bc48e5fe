#!/usr/bin/env bash
# Runs every libFuzzer target for SECONDS each (default 60), seeded from fuzz/seeds, with the
# corpus kept in fuzz/corpus (seeds are read, never written). Installs cargo-fuzz if missing.
# A crash leaves its input in fuzz/artifacts/TARGET and makes this script fail.
#
# cargo fuzz asks rustc for AddressSanitizer and coverage instrumentation through unstable
# flags. The machine's one toolchain is stable, so RUSTC_BOOTSTRAP=1 lets it accept them for
# this build only; the fuzz crate is a workspace of its own and shares no artifacts with the
# main build. (A nightly toolchain works the same way.)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=(frames openai_request certificate quote payment_message)
cargo fuzz build -O
mkdir -p fuzz/logs
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== fuzz $t (${seconds}s)"
  # The TDX vectors (with their license in crates/cocoon-testdata) seed the quote target.
  seeds="fuzz/seeds/$t"
  [ "$t" = quote ] && seeds="crates/cocoon-testdata/tdx"
  if ! cargo fuzz run -O "$t" "fuzz/corpus/$t" "$seeds" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 >"fuzz/logs/$t.log" 2>&1; then
    tail -40 "fuzz/logs/$t.log"
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t" >&2
    exit 1
  fi
  grep -E '^Done' "fuzz/logs/$t.log"
done
