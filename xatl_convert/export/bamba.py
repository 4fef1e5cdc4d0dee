"""transformers' Bamba (`model_type: bamba`): Mamba2 layers with attention at `attn_layer_indices`, a gated MLP
(`feed_forward.gate_proj/up_proj/down_proj`), `pre_ff_layernorm`, `model.final_layernorm`. Its attention hard-codes
`partial_rotary_factor = 0.5` and has no multipliers, so it is the exact home of pure Mamba2 conversions of the
Llama family, and of hybrids only where the kept attention rotates half of each head; vLLM serves it natively.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from xatl_convert.export.hybrids import hybrid_refusals, mamba2_config, mixer_name

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
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "attn_layer_indices": [i for i, kind in enumerate(config["layer_types"]) if kind == "attention"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "hidden_act": config["hidden_act"],
        "rms_norm_eps": config["norm_eps"],
        "max_position_embeddings": config["max_position_embeddings"],
        "rope_parameters": config["rope_parameters"],
        "attention_bias": config["attention_bias"],
        "mlp_bias": config["mlp_bias"],
        **mamba2_config(config),
        "tie_word_embeddings": config["tie_word_embeddings"],
        # transformers 5's hybrid cache asks an attention layer for the sequence length: with none, generate() runs
        # only without a cache (re-reading the prefix each step), so a pure Mamba2 export turns it off
        "use_cache": "attention" in config["layer_types"],
        "pad_token_id": config.get("pad_token_id"),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
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
    return [(mixer_name(name, config) or name, value)]
