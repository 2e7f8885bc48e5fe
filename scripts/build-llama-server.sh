#!/usr/bin/env bash
# Builds llama.cpp's own OpenAI server (llama-server), the reference `cocoon bench` measures
# the embedded engine against, into target/llama-server/bin/llama-server.
#
# The llama-cpp-2 crate ships llama.cpp without its server sources, so they come from the
# llama.cpp vendored in the llama-cpp-python source package on PyPI (pinned, SHA-256 checked).
# It is built as llama-cpp-sys-2 builds our copy: CPU only, GGML_NATIVE and OpenMP off, and
# the same GGML_* environment passed through, so the comparison is engine against engine.
#
# With --release-like it is built instead as llama.cpp's own release binaries are (OpenMP on,
# GGML_NATIVE off, no flags of ours), into target/llama-server-release/: the second reference,
# what someone running llama-server as shipped would get. (GGML_NATIVE=ON is not offered: it
# crashes in the first decode on some virtual CPUs, ours among them.)
set -euo pipefail
cd "$(dirname "$0")/.."

release_like=false
[ "${1:-}" = "--release-like" ] && release_like=true

version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
out=target/llama-server
$release_like && out=target/llama-server-release
bin="$out/bin/llama-server"
if [ -x "$bin" ]; then
    echo "llama-server ready: $bin"
    exit 0
fi
command -v cmake >/dev/null || { echo "cmake is needed: run scripts/setup.sh first" >&2; exit 1; }
src_dir=target/llama-server/src
mkdir -p "$src_dir"
tarball="$src_dir/llama_cpp_python-$version.tar.gz"
if [ ! -f "$tarball" ]; then
    echo "fetching llama-cpp-python $version sources from PyPI (for llama.cpp's server)"
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$src_dir"
fi
actual=$(sha256sum "$tarball" | cut -d' ' -f1)
if [ "$actual" != "$sha256" ]; then
    echo "checksum mismatch for $tarball: $actual" >&2
    exit 1
fi
src="$src_dir/llama_cpp_python-$version/vendor/llama.cpp"
[ -d "$src" ] || tar -xzf "$tarball" -C "$src_dir"

if $release_like; then
    echo "llama.cpp flags: as its release binaries (GGML_NATIVE=OFF, GGML_OPENMP=ON)"
    cmake -S "$src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF -DGGML_OPENMP=ON >/dev/null
    cmake --build "$out/build" --target llama-server -j "$(nproc)"
    mkdir -p "$out/bin"
    cp "$out/build/bin/llama-server" "$bin"
    echo "llama-server ready: $bin"
    exit 0
fi

# The instruction sets our own llama.cpp was built with (from its CMake cache, when built),
# then any GGML_* from the environment, as llama-cpp-sys-2 reads them.
ggml_env=()
ours=$(ls target/release/build/llama-cpp-sys-2-*/out/build/CMakeCache.txt 2>/dev/null | head -1 || true)
if [ -n "$ours" ]; then
    while IFS= read -r flag; do
        ggml_env+=("-D${flag%%:*}=${flag##*=}")
    done < <(grep -E '^GGML_(AVX[A-Z0-9_]*|FMA|F16C|BMI2|SSE42):BOOL=' "$ours")
fi
while IFS='=' read -r key value; do
    ggml_env+=("-D$key=$value")
done < <(env | grep '^GGML_' || true)
echo "llama.cpp flags: ${ggml_env[*]:-(defaults)}"

cmake -S "$src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_BLAS=OFF "${ggml_env[@]}" >/dev/null
cmake --build "$out/build" --target llama-server -j "$(nproc)"
mkdir -p "$out/bin"
cp "$out/build/bin/llama-server" "$bin"
echo "llama-server ready: $bin"
