"""Why an export's logits differ from the xatl model's from position 160 of a 190-token input, and not at all at
1024 tokens: SiLU on a strided view against the same values contiguous (PyTorch's CPU kernel).

transformers' torch fallback for the Mamba2 conv (`causal_conv1d_fn`) convolves with padding on both sides and
crops `[..., :seq_len]`, so the SiLU after it gets a strided view and runs row by row: whole blocks of 32 floats
(two AVX-512 vectors) take the vectorised exp, the last L mod 32 positions of each row the scalar one, which rounds
differently (≤ 1 ulp). xatl's conv output is contiguous and takes the vectorised path throughout. The first
differing position is 32·⌊L/32⌋: 160 for the 190-token sample, none for 64 or 1024 tokens.

    python -m benchmarks.silu_tail
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def main() -> None:
    torch.manual_seed(0)
    for length in (64, 190, 256, 1000, 1024, 1395):
        conv_out = torch.randn(1, 1728, length + 3) * 3  # SmolLM2 hybrid's conv channels, d_conv 4: 3 extra
        cropped = conv_out[:, :, :length]
        difference = (F.silu(cropped) - F.silu(cropped.contiguous())).abs().amax(dim=(0, 1))
        differing = difference.nonzero()
        first = int(differing[0]) if len(differing) else None
        print(f"{length:5} tokens: first differing position {first}, {len(differing)} positions differ, "
              f"max |Δ| {difference.max().item():.1e}; 32·⌊L/32⌋ = {32 * (length // 32)}")  # fmt: skip


if __name__ == "__main__":
    main()
