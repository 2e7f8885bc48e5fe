#!/usr/bin/env bash
# Installs what building and testing cocoon needs on a fresh Debian/Ubuntu machine:
# cmake and clang (llama.cpp is built from the llama-cpp-2 crate's sources), iproute2 (the
# multi-host test), the Python `openai` package (the SDK compatibility test), the contracts'
# pinned npm packages (Tolk compiler and the reference TON emulator, from contracts/package-lock.json),
# and the default model file.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v clang >/dev/null || need_apt+=(clang)
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v unzip >/dev/null || need_apt+=(unzip)
# `ip netns` and `tc` for the test that runs the network across namespaces (tests/hosts.rs).
command -v ip >/dev/null && command -v tc >/dev/null || need_apt+=(iproute2)
# nginx is the reference middlebox of `cocoon bench --sections hops` (tests/bench.rs runs it).
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
# A real Prometheus scrapes the roles' operator listeners in a test (tests/proxy/admin.rs).
command -v prometheus >/dev/null || need_apt+=(prometheus)
# A headless Chromium loads each role's dashboard in a test (tests/proxy/dashboard.rs).
command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || need_apt+=(chromium-headless-shell)
if [ ${#need_apt[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing ${need_apt[*]} with apt"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! python3 -c "import openai" 2>/dev/null; then
    echo "installing the openai Python package"
    python3 -m pip install -q "openai>=1.40,<3"
fi

if ! command -v cargo-nextest >/dev/null && ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

if ! command -v npm >/dev/null; then
    echo "npm is needed for the contracts (Tolk compiler, @ton/sandbox): install Node.js 18 or later" >&2
    exit 1
fi
# Reinstalled whenever the lockfile changes (the stamp is the lockfile the install used).
if ! cmp -s contracts/package-lock.json contracts/node_modules/.cocoon-lock 2>/dev/null; then
    echo "installing the contracts' npm packages"
    (cd contracts && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.cocoon-lock)
fi

scripts/fetch-model.sh
