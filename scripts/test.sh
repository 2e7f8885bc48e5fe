#!/usr/bin/env bash
# One command from a fresh checkout to the full test suite (the command CI runs): format,
# lints, the contracts (a recompile must reproduce the committed code; the scenarios in the
# reference emulator must match expected.json), and every test, the fuzz targets' seeds
# replayed among them (crates/cocoon-fuzzing). COCOON_FUZZ_SECONDS=N adds a libFuzzer run of N
# seconds per target at the end (scripts/fuzz.sh; off by default).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each phase's time, so a slow CI run says where the time went.
started=$SECONDS
phase() {
  local name=$1 t0=$SECONDS
  shift
  "$@"
  echo "== phase $name: $((SECONDS - t0)) s (total $((SECONDS - started)) s)"
}

phase setup scripts/setup.sh
phase fmt cargo fmt --all --check
phase clippy cargo clippy --workspace --all-targets --locked -- -D warnings
phase contracts bash -c 'cd contracts && npm run --silent check && npm test --silent'
phase test-build cargo nextest run --workspace --locked --profile ci --no-run
phase tests cargo nextest run --workspace --locked --profile ci "$@"
fuzz_seconds="${COCOON_FUZZ_SECONDS:-0}"
if [ "$fuzz_seconds" -gt 0 ]; then
  phase fuzz scripts/fuzz.sh "$fuzz_seconds"
fi
