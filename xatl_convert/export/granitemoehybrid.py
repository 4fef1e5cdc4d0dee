"""transformers' GraniteMoeHybrid (`model_type: granitemoehybrid`): Mamba2 and attention layers in any order, a
dense gated MLP (`shared_mlp`, no experts), RMSNorm, Granite's multipliers. The home of Llama-family conversions,
pure Mamba2 or hybrid, with any choice of kept layers; vLLM serves it natively.

Facts read from transformers' modeling_granitemoehybrid.py (5.x): `layer_types` entries are "linear_attention"
(Mamba2) and "full_attention"; `shared_mlp.input_linear` is [gate; up] (xatl's fc1 is [up; gate]); the softmax
scale is `attention_multiplier` itself; one `attention_bias` covers q, k, v and o, one `mamba_proj_bias` covers
in_proj and out_proj (the export writes zeros for a projection without one); the Mamba2 gated norm uses
`rms_norm_eps`, and its conv the model's `hidden_act`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from xatl_convert.export.hybrids import hybrid_config, hybrid_refusals, mixer_tensors

LOADS_WITH = "AutoModelForCausalLM, no remote code"
NAME = "granitemoehybrid"


def refusals(config: dict[str, Any]) -> list[str]:
    """Every reason the xatl config cannot become a GraniteMoeHybrid that computes the same, or []."""
    reasons = hybrid_refusals(config, "GraniteMoeHybrid", {"mlp_bias": False})
    if "attention" in config["layer_types"] and config.get("rope_parameters", {}).get("partial_rotary_factor", 1) != 1:
        reasons.append("partial rotary; GraniteMoeHybrid rotates the whole head")
    return reasons


def target_config(config: dict[str, Any]) -> dict[str, Any]:
    """GraniteMoeHybrid's config.json for an xatl config that `refusals` accepts."""
    return {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": NAME,
        **hybrid_config(config),
        "shared_intermediate_size": config["intermediate_size"],
        "num_local_experts": 0,
        "num_experts_per_tok": 0,
        "layer_types": [
            "full_attention" if kind == "attention" else "linear_attention" for kind in config["layer_types"]
        ],
        "position_embedding_type": "rope",
        "attention_multiplier": config.get("attention_multiplier") or config["head_dim"] ** -0.5,
        "embedding_multiplier": config.get("embedding_multiplier", 1.0),
        "residual_multiplier": config.get("residual_multiplier", 1.0),
        "logits_scaling": config.get("logits_scaling", 1.0),
    }


_RENAMES = (
    (r"model\.layers\.(\d+)\.input_norm\.", r"model.layers.\1.input_layernorm."),
    (r"model\.layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"model\.layers\.(\d+)\.mlp\.fc1\.", r"model.layers.\1.shared_mlp.input_linear."),
    (r"model\.layers\.(\d+)\.mlp\.fc2\.", r"model.layers.\1.shared_mlp.output_linear."),
    (r"model\.final_norm\.", "model.norm."),
)


def tensors(name: str, value: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The GraniteMoeHybrid name (and layout) of one xatl tensor."""
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            renamed = re.sub(pattern, replacement, name)
            if ".shared_mlp.input_linear." in renamed:  # xatl [up; gate] → Granite [gate; up]
                up, gate = value.chunk(2, dim=0)
                value = torch.cat([gate, up], dim=0)
            return [(renamed, value)]
    return mixer_tensors(name, value, config)  # else model.embed_tokens.weight, lm_head.weight
