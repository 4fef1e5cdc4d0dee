"""transformers' Bamba (`model_type: bamba`): Mamba2 layers with attention at `attn_layer_indices`, a gated MLP
(`feed_forward.gate_proj/up_proj/down_proj`), `pre_ff_layernorm`, `model.final_layernorm`. Its attention hard-codes
`partial_rotary_factor = 0.5` and has no multipliers, so it is the exact home of pure Mamba2 conversions of the
Llama family, and of hybrids only where the kept attention rotates half of each head; vLLM serves it natively.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from xatl_convert.export.hybrids import hybrid_config, hybrid_refusals, mixer_tensors

LOADS_WITH = "AutoModelForCausalLM, no remote code"
NAME = "bamba"


def refusals(config: dict[str, Any]) -> list[str]:
    """Every reason the xatl config cannot become a Bamba that computes the same, or []."""
    defaults = {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0}
    reasons = hybrid_refusals(config, "Bamba", defaults)
    if "attention" in config["layer_types"]:
        if config.get("rope_parameters", {}).get("partial_rotary_factor", 1.0) != 0.5:
            reasons.append("its attention layers rotate the whole head; Bamba's rotate half (partial_rotary_factor "
                           "0.5 is hard-coded): export a hybrid as granitemoehybrid")  # fmt: skip
        if config.get("attention_multiplier") not in (None, config["head_dim"] ** -0.5):
            reasons.append("a softmax scale other than head_dim ** -0.5; Bamba has none: use granitemoehybrid")
    return reasons


def target_config(config: dict[str, Any]) -> dict[str, Any]:
    """Bamba's config.json for an xatl config that `refusals` accepts."""
    return {
        "architectures": ["BambaForCausalLM"],
        "model_type": NAME,
        **hybrid_config(config),
        "attn_layer_indices": [i for i, kind in enumerate(config["layer_types"]) if kind == "attention"],
        "mlp_bias": config["mlp_bias"],
    }


_RENAMES = (
    (r"model\.layers\.(\d+)\.input_norm\.", r"model.layers.\1.input_layernorm."),
    (r"model\.layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.pre_ff_layernorm."),
    (r"model\.layers\.(\d+)\.mlp\.fc2\.", r"model.layers.\1.feed_forward.down_proj."),
    (r"model\.final_norm\.", "model.final_layernorm."),
)


def tensors(name: str, value: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """Bamba's name(s) for one xatl tensor: fc1 ([up; gate]) becomes up_proj and gate_proj."""
    fc1 = re.match(r"model\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", name)
    if fc1:
        up, gate = value.chunk(2, dim=0)
        prefix = f"model.layers.{fc1.group(1)}.feed_forward"
        return [(f"{prefix}.up_proj.{fc1.group(2)}", up), (f"{prefix}.gate_proj.{fc1.group(2)}", gate)]
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            return [(re.sub(pattern, replacement, name), value)]
    return mixer_tensors(name, value, config)
