#!/usr/bin/env bash
# Download what benchmarks/gpu_check.sh installs offline on a GPU machine, into .gpu-deps/ (git-ignored; it travels
# with the working tree). Run it here, on a machine that reaches PyPI.
#
# - the mamba-ssm and causal-conv1d sdists (CUDA code, built on the GPU machine). `pip download` builds an sdist's
#   metadata, and their setup.py needs CUDA unless told to skip the build; the *_SKIP_CUDA_BUILD variables only
#   affect this metadata step, not the build on the GPU machine.
# - wheels of xatl-convert's pure-Python dependencies that a bare CUDA image may lack (typer, rich, pydantic,
#   pyyaml, safetensors, huggingface-hub), for this machine's Python version.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-deps/wheels
MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
  pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
  "causal-conv1d==1.7.0" "mamba-ssm==2.3.2.post1" -d .gpu-deps
pip download --quiet --only-binary :all: -d .gpu-deps/wheels \
  typer rich pydantic pyyaml safetensors huggingface-hub einops
# fla (Gated DeltaNet's chunk_gated_delta_rule, fused_recurrent_gated_delta_rule): pure Python on Triton
pip download --quiet --only-binary :all: --no-deps -d .gpu-deps/wheels "flash-linear-attention==0.6.0" "fla-core==0.6.0"
ls -la .gpu-deps .gpu-deps/wheels
