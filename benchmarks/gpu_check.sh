#!/usr/bin/env bash
# Prepare a GPU machine and run every GPU check of xatl-convert; results go to $OUT (or benchmarks/gpu-results).
#
# Assumes CUDA, nvcc, torch, triton and transformers are installed, and no internet. Everything else comes from
# .gpu-deps/ (run benchmarks/fetch_gpu_deps.sh first, on a machine with PyPI access; the folder is git-ignored and
# travels with the working tree):
#   1. pure-Python dependencies from .gpu-deps/wheels, where missing;
#   2. causal-conv1d and mamba-ssm built from their sdists for this GPU's architecture only (see gpu_check.py
#      patch-sources: their setup.py would otherwise compile for ~10 architectures); fla from its wheels;
#   3. xatl-convert itself (editable, no dependencies fetched);
#   4. benchmarks/gpu_check.py run: convert + verify on CUDA, kernels against the reference path, one JSON.
# SKIP_INSTALL=1 skips steps 1-3; DEVICE=cpu runs step 4 on the CPU (what can be tested without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
results="${OUT:-benchmarks/gpu-results}"
mkdir -p "$results"
device="${DEVICE:-cuda}"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python -c "import typer, rich, pydantic, yaml, safetensors, huggingface_hub, einops" 2>/dev/null ||
    pip install --no-index --find-links .gpu-deps/wheels typer rich pydantic pyyaml safetensors huggingface-hub einops
  if ! python -c "import mamba_ssm, causal_conv1d" 2>/dev/null; then
    arch=$(python -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')")
    build=$(mktemp -d)
    python benchmarks/gpu_check.py patch-sources --arch "$arch" --into "$build"
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}" CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
    start=$(date +%s)
    pip install --no-index --no-deps --no-build-isolation "$build"/causal_conv1d-*/
    pip install --no-index --no-deps --no-build-isolation "$build"/mamba_ssm-*/
    echo "built causal-conv1d and mamba-ssm for sm_$arch in $(( $(date +%s) - start )) s"
  fi
  python -c "import fla" 2>/dev/null ||
    pip install --no-index --no-deps --find-links .gpu-deps/wheels flash-linear-attention fla-core ||
    echo "fla not installed: Gated DeltaNet runs its stand-ins (benchmarks/fetch_gpu_deps.sh fetches it)"
  pip install --no-index --no-deps --no-build-isolation -e . >/dev/null
fi

python benchmarks/gpu_check.py run --device "$device" $([ "$device" = cpu ] && echo --quick) \
  --json "$results/gpu_check.json"
