#!/usr/bin/env bash
# Does a converted folder still load as remote code on the oldest transformers pyproject.toml allows (5.0.0, which
# has no use_kernel_func_from_hub_with_fallback), and does its kernel call path run there (our fallback)?
# Makes a throw-away venv in $WORK (default /tmp/xatl-oldest-tf) with torch 2.13.0 and transformers 5.0.0 only.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${WORK:-/tmp/xatl-oldest-tf}"
[ -x "$work/venv/bin/python" ] || { python3 -m venv "$work/venv" && "$work/venv/bin/pip" install -q torch==2.13.0 transformers==5.0.0; }
rm -rf "$work/out" && xatl convert examples/pythia-tiny --to mamba2 --attn-layers 1 --out "$work/out" >/dev/null
cd "$work" && HF_HUB_OFFLINE=1 HF_HOME="$work/hf" "$work/venv/bin/python" - "$work/out" <<'PY'
import sys, torch, transformers
from transformers import AutoModelForCausalLM

assert "xatl_convert" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
kernels = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".kernels_xatl"]
ids = torch.arange(30)[None] % model.config.vocab_size
with torch.no_grad():
    reference = model(ids).logits
    with kernels.kernel_path("kernels"):
        kernel = model(ids).logits
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
error = ((kernel - reference).norm() / reference.norm()).item()
print(f"transformers {transformers.__version__}: loaded as remote code; kernel call path (stand-ins) vs reference "
      f"{error:.1e}; generate -> {tuple(tokens.shape)}")
assert error <= 1e-5
PY
