"""CPU forward time of the xatl reference mixers against transformers' own torch paths, same shapes, same run.

Shapes are mamba-130m's (hidden 768, 24 layers, vocab 50280; Mamba: d_state 16, expand 2; Mamba2: d_state 128,
headdim 64, expand 2, chunk 256), input 1 × 256 tokens, fp32, 2 threads. Two comparisons:
  mixer   one xatl mixer against transformers' MambaMixer / Mamba2Mixer torch forward, with the same weights
          (the parameter names are the same, so the state dict is shared);
  model   XatlForCausalLM (24 Mamba or Mamba2 layers; its MLP given width 1, since the HF models have none)
          against MambaForCausalLM / Mamba2ForCausalLM.
transformers runs its torch path here because mamba-ssm is not importable (it decides at import).

    python benchmarks/forward_bench.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from xatl_convert.models import XatlConfig, XatlForCausalLM

HIDDEN, LAYERS, VOCAB, TOKENS = 768, 24, 50280, 256


def median_seconds(function, repeats: int) -> float:
    with torch.no_grad():
        function()  # warm-up
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def xatl_config(kind: str, layers: int) -> XatlConfig:
    settings = {
        "mamba": {"d_state": 16, "d_conv": 4, "expand": 2},
        "mamba2": {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256},
    }
    return XatlConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, intermediate_size=1,
                      norm_type="rmsnorm", norm_bias=False, mlp_bias=False, parallel_residual=False,
                      num_attention_heads=12, layer_types=[kind] * layers, **{kind: settings[kind]})  # fmt: skip


def hf_model(kind: str, layers: int) -> torch.nn.Module:
    if kind == "mamba":
        return MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                                            state_size=16, expand=2, conv_kernel=4))  # fmt: skip
    return Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                                          state_size=128, expand=2, head_dim=64, num_heads=24, n_groups=1,
                                          chunk_size=256, conv_kernel=4))  # fmt: skip


def compare(kind: str, repeats: int) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, TOKENS))
    ours, theirs = XatlForCausalLM(xatl_config(kind, LAYERS)).eval(), hf_model(kind, LAYERS).eval()
    our_mixer, their_mixer = ours.model.layers[0].mixer, theirs.backbone.layers[0].mixer
    missing = our_mixer.load_state_dict(their_mixer.state_dict(), strict=False)
    assert not missing.unexpected_keys, missing
    hidden = torch.randn(1, TOKENS, HIDDEN)
    with torch.no_grad():
        assert torch.allclose(our_mixer(hidden), their_mixer(hidden), atol=1e-3, rtol=1e-3), "mixers disagree"
    return {
        "mixer": (median_seconds(lambda: our_mixer(hidden), repeats), median_seconds(lambda: their_mixer(hidden),
                                                                                        repeats)),
        "model": (median_seconds(lambda: ours(ids), max(1, repeats // 3)),
                  median_seconds(lambda: theirs(ids), max(1, repeats // 3))),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| mixer | what | xatl reference | transformers torch path | xatl / transformers |")
    print("|---|---|---:|---:|---:|")
    for kind in ("mamba", "mamba2"):
        for what, (ours, theirs) in compare(kind, args.repeats).items():
            print(f"| {kind} | {what} | {ours * 1000:.1f} ms | {theirs * 1000:.1f} ms | {ours / theirs:.2f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
