#!/usr/bin/env bash
# One command from a fresh checkout to the full test suite (the command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
exec cargo nextest run --workspace --locked --profile ci "$@"
