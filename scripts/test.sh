#!/usr/bin/env bash
# One command from a fresh checkout to the full test suite (the command CI runs): format, the
# contracts (a recompile must reproduce the committed code; the scenarios in the reference
# emulator must match expected.json), clippy while building, and every test, the fuzz targets' seeds
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
phase contracts bash -c 'cd contracts && npm run --silent check && npm test --silent'

# Clippy in the same pass as the test build: with clippy-driver as the workspace's rustc
# wrapper (what `cargo clippy` itself sets), our crates are linted while they are compiled, so
# CI never type-checks the ~400 dependencies a second time in check mode (about three of the
# fifteen minutes on 2 cores). Same lints, same `-D warnings`, every target: a lint failure
# fails this phase. The exports stay for the test run, which then rebuilds nothing.
clippy_driver="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)"
export RUSTC_WORKSPACE_WRAPPER="$clippy_driver"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
phase build-and-clippy cargo nextest run --workspace --all-targets --locked --profile ci --no-run
phase tests cargo nextest run --workspace --locked --profile ci "$@"
fuzz_seconds="${COCOON_FUZZ_SECONDS:-0}"
if [ "$fuzz_seconds" -gt 0 ]; then
  unset RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS
  phase fuzz scripts/fuzz.sh "$fuzz_seconds"
fi
