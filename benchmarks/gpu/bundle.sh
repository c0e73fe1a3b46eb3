#!/usr/bin/env bash
# Wheels for running benchmarks/gpu/run_gpu_checks.sh on a GPU machine that has Python, torch
# and numpy but cannot reach a package index (the lent H200 of this workplace: Python 3.12,
# torch 2.11 with CUDA 13, no network).
#   benchmarks/gpu/bundle.sh [DIR]          # default .gpu-bundle (git-ignored); about 5 MB
#   GPU_PYTHON_VERSION=3.11 benchmarks/gpu/bundle.sh DIR   # for another Python (default 3.12)
# DIR then holds infercore, infercore-torch and infercore-onnx as wheels (for their metadata:
# run_gpu_checks.sh imports their code from the working tree), and the third-party packages
# they need that such a machine lacks (bundle_requirements.py, against device_packages.txt), at
# the versions of this project's environment. Carry DIR to the machine; run_gpu_checks.sh
# installs it into a temporary folder by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest="${1:-.gpu-bundle}"
pyver="${GPU_PYTHON_VERSION:-3.12}"
abi="cp${pyver/./}"

[ -x .venv/bin/python ] || { echo "bundle: no .venv: run 'uv sync' first" >&2; exit 2; }
pins=()
while IFS= read -r pin; do pins+=("$pin"); done < <(
    .venv/bin/python benchmarks/gpu/bundle_requirements.py --python-version "$pyver"
)
[ "${#pins[@]}" -gt 0 ] || { echo "bundle: no requirements found" >&2; exit 2; }
rm -rf "$dest"
mkdir -p "$dest"
for package in infercore infercore-torch infercore-onnx; do
    uv build --quiet --wheel --package "$package" --out-dir "$dest"
done
rm -f "$dest/.gitignore"

.venv/bin/python -m pip --version >/dev/null 2>&1 || uv pip install --quiet --python .venv pip
for pin in "${pins[@]}"; do
    # A wheel for that Python on x86-64 Linux; a project published only as an sdist
    # (antlr4-python3-runtime, pure Python) is built into one here.
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
        --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 --platform any "$pin" 2>/dev/null && continue
    built="$(mktemp -d)"
    .venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir "$built" "$pin"
    for wheel in "$built"/*.whl; do
        # Built by this machine's Python: only a pure-Python wheel suits another one.
        [[ "$wheel" == *-none-any.whl ]] || {
            echo "bundle: no wheel of $pin for CPython $pyver on x86-64 Linux could be" \
                "downloaded (none published, or no network), and it is not pure Python" >&2
            exit 2
        }
        mv "$wheel" "$dest/"
    done
    rm -rf "$built"
done
git rev-parse HEAD >"$dest/COMMIT" 2>/dev/null || true
count="$(find "$dest" -name '*.whl' | wc -l)"
echo "bundle: $count wheels for Python $pyver in $dest ($(du -sh "$dest" | cut -f1))"
