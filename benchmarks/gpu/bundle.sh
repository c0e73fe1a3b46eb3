#!/usr/bin/env bash
# Wheels for running benchmarks/gpu/run_gpu_checks.sh on a GPU machine that has Python, torch
# and numpy but cannot reach a package index (the lent H200 of this workplace: Python 3.12,
# torch 2.11 with CUDA 13, no network).
#   benchmarks/gpu/bundle.sh [DIR]          # default .gpu-bundle (git-ignored); about 10 MB
#   GPU_PYTHON_VERSION=3.11 benchmarks/gpu/bundle.sh DIR   # for another Python (default 3.12)
# DIR then holds infercore, infercore-torch and infercore-onnx as wheels (for their metadata:
# run_gpu_checks.sh imports their code from the working tree), and the third-party packages
# they need that such a machine lacks, at the versions of this project's environment. Carry
# DIR to the machine; run_gpu_checks.sh installs it into a temporary folder by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest="${1:-.gpu-bundle}"
pyver="${GPU_PYTHON_VERSION:-3.12}"
abi="cp${pyver/./}"

# What infercore, infercore-torch and infercore-onnx need (uvicorn with its standard extras)
# beyond what the device image holds (its package list in the device tool's KINDS.md:
# torch, numpy, onnx, onnxruntime, pluggy, prometheus-client, pyyaml, uvloop, httpx, anyio,
# click, rich, typing-extensions, multidict, pytest, pytest-timeout, hypothesis are there).
missing=(
    antlr4-python3-runtime faker httptools hydra-core litestar litestar-htmx msgspec multipart
    omegaconf polyfactory python-dotenv rich-click sniffio uvicorn watchfiles websockets
)

[ -x .venv/bin/python ] || { echo "bundle: no .venv: run 'uv sync' first" >&2; exit 2; }
rm -rf "$dest"
mkdir -p "$dest"
for package in infercore infercore-torch infercore-onnx; do
    uv build --quiet --wheel --package "$package" --out-dir "$dest"
done
rm -f "$dest/.gitignore"

pins=()
for name in "${missing[@]}"; do
    version="$(.venv/bin/python -c 'import importlib.metadata as m, sys
print(m.version(sys.argv[1]))' "$name")" || { echo "bundle: $name is not in .venv" >&2; exit 2; }
    pins+=("$name==$version")
done
# Every one but antlr4-python3-runtime (an sdist only, pure Python: built here) has wheels.
binary=()
for pin in "${pins[@]}"; do
    [[ "$pin" == antlr4-python3-runtime==* ]] || binary+=("$pin")
done
.venv/bin/python -m pip --version >/dev/null 2>&1 || uv pip install --quiet --python .venv pip
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
    --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 --platform any \
    "${binary[@]}"
for pin in "${pins[@]}"; do
    if [[ "$pin" == antlr4-python3-runtime==* ]]; then
        .venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir "$dest" "$pin"
    fi
done
git rev-parse HEAD >"$dest/COMMIT" 2>/dev/null || true
count="$(find "$dest" -name '*.whl' | wc -l)"
echo "bundle: $count wheels for Python $pyver in $dest ($(du -sh "$dest" | cut -f1))"
