#!/usr/bin/env bash
# GPU checks of infercore-torch (and infercore-onnx io_binding), for a machine with an NVIDIA GPU.
#   benchmarks/gpu/run_gpu_checks.sh [OUT_DIR]       # default: $OUT, else benchmarks/gpu/results
#   ALLOW_CPU=1 benchmarks/gpu/run_gpu_checks.sh DIR  # no GPU: run the CPU parts only
#   BENCH=0 benchmarks/gpu/run_gpu_checks.sh DIR      # the gpu tests only (under a minute)
# Python: $PYTHON when set; else .venv's (needs the CUDA build of torch there: `uv pip install
# --python .venv torch`; the lock never installs torch, and .ci/install-torch-cpu installs the
# CPU build); else python3. Except with .venv's, the wheels of benchmarks/gpu/bundle.sh
# (.gpu-bundle, or $GPU_BUNDLE), when there, are installed into a temporary folder first: a
# machine with torch but no package index.
# Bounded: about 5 minutes with CUDA (DURATION=10 s per run).
#  1. the `gpu`-marked tests (skip without CUDA) of plugins/torch and plugins/onnx;
#  2. bench_torch_batching.py: torch-gpu vs dynamic batching, CPU and CUDA, JSON + markdown;
#     with CUDA also one staging slot vs three (slots1/), 256 clients with batches of 128
#     (large/) and 224x224 images (image224/).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-benchmarks/gpu/results}}"
mkdir -p "$out"
bundle="${GPU_BUNDLE:-.gpu-bundle}"
if [ -n "${PYTHON:-}" ]; then
    py=("$PYTHON")
elif [ -x .venv/bin/python ]; then
    py=(.venv/bin/python)
    bundle=""
elif [ -d "$bundle" ]; then
    py=(python3)
else
    py=(uv run --no-sync python)
    bundle=""
fi
if [ -n "$bundle" ] && [ -d "$bundle" ]; then
    # infercore's code comes from this tree; the wheels give its metadata (the plugins' entry
    # points) and the third-party packages the machine lacks.
    site="$(mktemp -d)/site"
    "${py[@]}" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$site" "$bundle"/*.whl
    export PYTHONPATH="$PWD:$PWD/plugins/torch/src:$PWD/plugins/onnx/src:$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu-checks: $("${py[@]}" --version) with $(ls "$bundle"/*.whl | wc -l) wheels of $bundle" \
        "(built at $(cat "$bundle/COMMIT" 2>/dev/null || echo '?'))" >&2
fi
duration="${DURATION:-10}"

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "gpu-checks: nvidia-smi not available" >&2
if ! "${py[@]}" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    if [ "${ALLOW_CPU:-0}" != 1 ]; then
        echo "gpu-checks: torch sees no CUDA device (CPU build, or no GPU); set ALLOW_CPU=1 to" \
            "run the CPU parts anyway" >&2
        exit 3
    fi
    echo "gpu-checks: no CUDA device: the gpu tests will skip and only CPU runs are measured" >&2
fi
"${py[@]}" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no device")' \
    | tee "$out/torch.txt"

status=0
timeout 300 "${py[@]}" -m pytest -m gpu plugins/torch plugins/onnx -q -rs -p no:cacheprovider \
    --junitxml "$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.txt" || status=$?
if [ "${BENCH:-1}" = 0 ]; then
    echo "gpu-checks: BENCH=0: tests only; results in $out (exit $status)"
    exit "$status"
fi
timeout 600 "${py[@]}" benchmarks/gpu/bench_torch_batching.py --out "$out" \
    --duration "$duration" 2>&1 | tee "$out/bench.txt" || status=$?
if "${py[@]}" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    # CUDA only: one staging slot (no overlap of consecutive batches) against the default three,
    # and larger batches under more clients.
    timeout 300 "${py[@]}" benchmarks/gpu/bench_torch_batching.py --out "$out/slots1" --skip-cpu \
        --gpu-slots 1 --duration "$duration" 2>&1 | tee -a "$out/bench.txt" || status=$?
    timeout 300 "${py[@]}" benchmarks/gpu/bench_torch_batching.py --out "$out/large" --skip-cpu \
        --clients 256 --max-batch 128 --duration "$duration" 2>&1 | tee -a "$out/bench.txt" \
        || status=$?
    # 224x224 images (600 KB a request): where pinned buffers and overlapped copies pay.
    timeout 300 "${py[@]}" benchmarks/gpu/bench_torch_batching.py --out "$out/image224" \
        --skip-cpu --image-size 224 --duration "$duration" 2>&1 | tee -a "$out/bench.txt" \
        || status=$?
fi
echo "gpu-checks: results in $out (exit $status)"
exit "$status"
