"""The reference path's short convolution in fp32 (now) against bf16 (before), in bf16 mixers on a CPU.

causal-conv1d accumulates in fp32 whatever the input dtype, so the reference conv now does too (it was a bf16
conv1d for bf16 models). This times one Mamba and one Mamba2 mixer at a 1B model's width (hidden 2048, d_inner
4096, Mamba2 d_state 128) on the reference path, with either conv, in the same run: a 2048-token prefill and
32 decoding steps after a 256-token prefix. Ratios > 1: fp32 is faster.

    python benchmarks/cpu_conv_bench.py
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

from xatl_convert.models import XatlCache, XatlConfig, XatlForCausalLM, modeling_xatl
from xatl_convert.models.kernels_xatl import kernel_path

HIDDEN, PREFILL, PREFIX, STEPS = 2048, 2048, 256, 32
FP32_CONV = modeling_xatl._causal_conv_silu


def bf16_conv(x: torch.Tensor, conv: torch.nn.Conv1d, previous: torch.Tensor | None) -> torch.Tensor:
    """The reference conv as it was: conv1d in the input's dtype."""
    width = conv.kernel_size[0]
    full = F.pad(x, (width - 1, 0)) if previous is None else torch.cat([previous.to(x.dtype), x], dim=-1)
    return F.silu(F.conv1d(full, conv.weight, conv.bias, groups=conv.groups))


def measure(mixer: torch.nn.Module, config: XatlConfig, tokens: torch.Tensor) -> tuple[float, float]:
    """(prefill ms, median step ms) on the reference path."""
    with kernel_path("reference"), torch.no_grad():
        mixer(tokens[:, :64])  # warm-up
        start = time.perf_counter()
        mixer(tokens[:, :PREFILL])
        prefill = 1000 * (time.perf_counter() - start)
        cache = XatlCache(config, 1, dtype=tokens.dtype)
        mixer(tokens[:, :PREFIX], cache=cache)
        cache.seen_tokens = PREFIX
        steps = []
        for t in range(PREFIX, PREFIX + STEPS):
            start = time.perf_counter()
            mixer(tokens[:, t : t + 1], cache=cache)
            steps.append(1000 * (time.perf_counter() - start))
            cache.seen_tokens = t + 1
    return prefill, statistics.median(steps)


def main() -> None:
    header = ("mixer (bf16)", "prefill bf16/fp32 conv ms", "ratio", "step bf16/fp32 conv ms", "ratio")
    print(f"{header[0]:10} {header[1]:>27} {header[2]:>6} {header[3]:>24} {header[4]:>6}")
    for kind in ("mamba", "mamba2"):
        sizes = {"hidden_size": HIDDEN, "intermediate_size": 4 * HIDDEN, "num_attention_heads": 32}
        mamba2 = {"d_state": 128, "headdim": 64}
        config = XatlConfig(vocab_size=256, num_hidden_layers=1, layer_types=[kind], mamba2=mamba2, **sizes)
        torch.manual_seed(0)
        mixer = XatlForCausalLM(config).model.layers[0].mixer.eval().to(torch.bfloat16)
        tokens = torch.randn(1, PREFILL, HIDDEN, dtype=torch.bfloat16)
        with mock.patch.object(modeling_xatl, "_causal_conv_silu", bf16_conv):
            before = measure(mixer, config, tokens)
        after = measure(mixer, config, tokens)
        print(f"{kind:10} {before[0]:13.0f} /{after[0]:7.0f} {before[0] / after[0]:10.2f} "
              f"{before[1]:12.2f} /{after[1]:6.2f} {before[1] / after[1]:10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
