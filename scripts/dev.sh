#!/usr/bin/env bash
# One command from a fresh checkout to a running network: set up, build, `cocoon dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --bin cocoon -- dev "$@"
