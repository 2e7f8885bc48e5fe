#!/usr/bin/env bash
# One command from a fresh checkout to the full test suite (the command CI runs): format,
# lints, the contracts (a recompile must reproduce the committed code; the scenarios in the
# reference emulator must match expected.json), every test, then a short run of every fuzz target (COCOON_FUZZ_SECONDS each, 20 by
# default; 0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
(cd contracts && npm run --silent check && npm test --silent)
cargo nextest run --workspace --locked --profile ci "$@"
fuzz_seconds="${COCOON_FUZZ_SECONDS:-20}"
if [ "$fuzz_seconds" -gt 0 ]; then
  scripts/fuzz.sh "$fuzz_seconds"
fi
